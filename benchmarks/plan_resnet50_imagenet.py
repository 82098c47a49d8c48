"""The neighbourhood plan on paper for a torchvision ResNet-50 on ImageNet (224x224), 100k images x
4 views, float16 cache, student ``teacher:inner=0.5``: each neighbourhood's parameters and FLOPs,
the teacher's activation bytes at every cut, and what each rank makes and reads of the cache,
for block and stage cuts over 2 and 8 ranks. No timing (``synthkd distill --plan`` measures step
times on the machine that will run): the ranks are balanced by counted FLOPs, as one process
balances them, with the run's own balance(), boundary_builders() and cache_bytes().

    python benchmarks/plan_resnet50_imagenet.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from synthkd.accelerator import make_accelerator
from synthkd.data.activation_cache import boundaries_of, boundary_builders, cache_bytes
from synthkd.models import load_model
from synthkd.models.born import count_flops
from synthkd.neighbourhood_training import NeighbourhoodDistiller, balance
from synthkd.pipelines.distill import DistillSettings, StudentSettings, student_for
from synthkd.teacher_activations import human

IMAGES, VIEWS, DTYPE = 100_000, 4, "float16"
IMAGENET = {"input_shape": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# The stem (conv1, bn1, relu, maxpool) is one neighbourhood: `--cuts stages` or `blocks` would cut
# after each of its modules, and each of those cuts stores a 64x112x112 activation.
BLOCKS = [3, 4, 6, 3]
CUTS = {"stages": "maxpool,layer1,layer2,layer3,layer4",
        "blocks": ",".join(["maxpool"] + [f"layer{s + 1}.{b}" for s, n in enumerate(BLOCKS) for b in range(n)])}


def on_paper(cuts: str, ranks: list[int]) -> dict:
    teacher = load_model("torchvision:resnet50", **IMAGENET).eval()
    settings = DistillSettings(mode="neighbourhood", cuts=CUTS[cuts], cache_views=VIEWS, cache_dtype=DTYPE)
    student = student_for(StudentSettings(arch="teacher:inner=0.5"), settings, teacher)
    distiller = NeighbourhoodDistiller(teacher, student, settings.neighbourhoods(0), make_accelerator(), owned=[])
    shapes = [tuple(distiller.probes[0].shape[1:])] + [tuple(p.shape[1:]) for p in distiller.probes[1:]]
    with torch.no_grad():
        shapes.append(tuple(distiller.teacher_split.pieces[-1](distiller.probes[-1]).shape[1:]))
    boundary = [cache_bytes([s], IMAGES, VIEWS, DTYPE) for s in shapes]
    flops = [count_flops(n, p[:1]) for n, p in zip(distiller.neighbourhoods, distiller.probes)]
    found = {
        "cuts": cuts, "images": IMAGES, "views": VIEWS, "dtype": DTYPE, "cache_bytes": sum(boundary),
        "neighbourhoods": [{"name": name, "parameters": sum(p.numel() for p in n.parameters()), "gflops_per_image": f / 1e9,
                            "output_shape": list(shapes[k + 1]), "output_bytes": boundary[k + 1]}
                           for k, (name, n, f) in enumerate(zip(distiller.names, distiller.neighbourhoods, flops))],
        "input_bytes": boundary[0], "ranks": {},
    }
    for count in ranks:
        owned = balance([float(f) for f in flops], count)
        builders = boundary_builders(owned, len(shapes))
        found["ranks"][count] = [{
            "neighbourhoods": [distiller.names[k] for k in mine], "gflops_per_image": sum(flops[k] for k in mine) / 1e9,
            "disk_bytes": sum(boundary[b] for b, r in enumerate(builders) if r == rank),
            "memory_bytes": sum(boundary[b] for b in boundaries_of(mine)),
        } for rank, mine in enumerate(owned)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="Also write the figures to this file.")
    args = parser.parse_args()
    figures = [on_paper("stages", [2, 4]), on_paper("blocks", [2, 8])]
    for plan in figures:
        print(f"\n{plan['cuts']} cuts: cache {human(plan['cache_bytes'])} ({plan['images']} images x {plan['views']} views, "
              f"{plan['dtype']}); the input images {human(plan['input_bytes'])}")
        for n in plan["neighbourhoods"]:
            print(f"  {n['name']:<10} {n['parameters']:>11,} params {n['gflops_per_image']:>7.3f} GFLOPs/image  "
                  f"out {'x'.join(map(str, n['output_shape'])):<12} {human(n['output_bytes']):>9}")
        for count, ranks in plan["ranks"].items():
            print(f"  {count} ranks:")
            for rank, r in enumerate(ranks):
                print(f"    rank {rank}: {', '.join(r['neighbourhoods'])} ({r['gflops_per_image']:.2f} GFLOPs/image); "
                      f"makes {human(r['disk_bytes'])} on disk, reads {human(r['memory_bytes'])}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=2)


if __name__ == "__main__":
    main()
