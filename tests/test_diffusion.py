"""Diffusion pipelines as the synthetic-data stage, with tiny randomly initialised diffusers
pipelines built and saved here (no download): unconditional DDPM, text-to-image (Stable
Diffusion layout with a tiny CLIP text encoder and tokenizer) and class-conditional (DiT);
the teacher's selection (confidence, class balancing), resume, train-diffusion, two ranks."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner

from synthkd.cli import main
from synthkd.data.format import shard_name
from synthkd.data.reader import SyntheticDataset
from synthkd.errors import SynthkdError
from synthkd.generators.diffusion import DiffusionGenerator, DiffusionSettings, load_pipeline, pipeline_fingerprint
from synthkd.pipelines.generate import SelectionSettings, generate

from conftest import REPO, free_port, subprocess_env
from test_cli import error_line, ok
from conftest import launcher

STEPS = 3


def save_ddpm(path, sample_size=8, channels=1):
    """An untrained UNet2DModel DDPM pipeline written with save_pretrained."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4)


def save_text_to_image(path):
    """A Stable Diffusion pipeline of 16x16 RGB images: tiny UNet2DConditionModel, AutoencoderKL,
    CLIP text encoder, and a CLIP tokenizer over printable ASCII characters written here."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_dir = path.parent / "vocab"
    vocab_dir.mkdir()
    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", *characters, *(c + "</w>" for c in characters)]
    (vocab_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    (vocab_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return path


def save_class_conditional(path):
    """A DiT pipeline (DiT's null class for guidance is id 1000, hence 1000 label ids)."""
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DPMSolverMultistepScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return save_ddpm(tmp_path_factory.mktemp("ddpm") / "pipeline")


@pytest.fixture(scope="module")
def text_to_image_dir(tmp_path_factory):
    return save_text_to_image(tmp_path_factory.mktemp("sd") / "pipeline")


def diffusion(teacher, pipeline, class_table=None, **settings):
    table = json.dumps(class_table) if class_table is not None else None
    config = DiffusionSettings(str(pipeline), steps=settings.pop("steps", STEPS), class_table=table, **settings)
    return DiffusionGenerator(config, teacher.input_format, teacher.config.class_names)


def test_ddpm_pipeline_loaded_by_path_into_shards(teacher, ddpm_dir, tmp_path, accelerator):
    generator = diffusion(teacher, ddpm_dir, scheduler="ddim")
    assert generator.conditioning == "unconditional" and generator.output_shape == (1, 8, 8)
    assert type(generator.pipeline.scheduler).__name__ == "DDIMScheduler"
    manifest = generate(teacher, generator, 20, tmp_path / "set", batch_size=8, seed=3, accelerator=accelerator)
    data = SyntheticDataset(tmp_path / "set")
    assert len(data) == 20 and data.images.shape[1:] == teacher.input_format.shape
    assert 0 <= float(data.images.min()) and float(data.images.max()) <= 1
    with torch.no_grad():
        predicted = teacher(data.images)
    assert torch.allclose(data.logits, predicted, atol=1e-5)  # soft labels: the teacher's logits
    # An unconditional model aims at nothing: the target is the teacher's label.
    assert torch.equal(data.targets, predicted.argmax(1))
    assert manifest["config"]["conditioning"] == "unconditional" and "report" not in manifest
    # Distinct seeds per shard: no two shards alike; the same seed remakes the same images.
    assert not torch.allclose(data.images[:4], data.images[8:12])
    generate(teacher, diffusion(teacher, ddpm_dir, scheduler="ddim"), 20, tmp_path / "again", batch_size=8, seed=3,
             accelerator=accelerator)
    assert torch.equal(SyntheticDataset(tmp_path / "again").images, data.images)


def make_set(teacher, pipeline, out, selection, accelerator):
    generate(teacher, diffusion(teacher, pipeline), 40, out, batch_size=20, accelerator=accelerator, selection=selection)
    return SyntheticDataset(out)


def test_class_balancing_keeps_drawing_and_reports(teacher, ddpm_dir, tmp_path, accelerator):
    plain = make_set(teacher, ddpm_dir, tmp_path / "plain", SelectionSettings(), accelerator)
    one_try = generate(teacher, diffusion(teacher, ddpm_dir), 40, tmp_path / "one", batch_size=20, accelerator=accelerator,
                       selection=SelectionSettings(balance=True, max_tries=1))
    many = generate(teacher, diffusion(teacher, ddpm_dir), 40, tmp_path / "many", batch_size=20, accelerator=accelerator,
                    selection=SelectionSettings(balance=True, max_tries=12))
    # Without balancing the untrained model's class mix is the teacher's opinion of noise: lopsided.
    assert max(plain.manifest["counts_per_class"]) > 4
    for manifest in (one_try, many):
        report = manifest["report"]
        assert manifest["counts_per_class"] == [4] * 10 == report["wanted"]
        assert [a + f for a, f in zip(report["accepted"], report["filled"])] == report["wanted"]
        assert report["shards_without_report"] == 0
    assert one_try["report"]["tries"] == 2  # one per shard
    assert sum(one_try["report"]["drawn"]) == 40
    # More tries: more draws, more slots filled by images the teacher puts in their class.
    assert many["report"]["tries"] > 2 and sum(many["report"]["drawn"]) > 40
    assert sum(many["report"]["accepted"]) > sum(one_try["report"]["accepted"])
    data = SyntheticDataset(tmp_path / "many")
    labels = data.logits.argmax(1)
    accepted = int((labels == data.targets).sum())
    assert accepted >= sum(many["report"]["accepted"])


def test_confidence_filter(teacher, ddpm_dir, tmp_path, accelerator):
    probabilities = make_set(teacher, ddpm_dir, tmp_path / "plain", SelectionSettings(), accelerator).logits.softmax(1)
    threshold = float(probabilities.max(1).values.median())
    manifest = generate(teacher, diffusion(teacher, ddpm_dir), 40, tmp_path / "sure", batch_size=20,
                        accelerator=accelerator, selection=SelectionSettings(min_confidence=threshold, max_tries=8))
    report = manifest["report"]
    confidence = SyntheticDataset(tmp_path / "sure").logits.softmax(1).max(1).values
    assert int((confidence >= threshold).sum()) >= sum(report["accepted"]) > 20
    assert manifest["config"]["selection"] == {"min_confidence": threshold, "balance": False, "max_tries": 8}


def test_resumed_balanced_run_remakes_the_lost_shard(teacher, ddpm_dir, tmp_path, accelerator):
    out = tmp_path / "set"
    selection = SelectionSettings(balance=True, max_tries=3)
    first = generate(teacher, diffusion(teacher, ddpm_dir), 30, out, batch_size=10, accelerator=accelerator,
                     selection=selection)
    before = SyntheticDataset(out)
    (out / shard_name(1)).unlink()
    (out / "manifest.json").unlink()
    second = generate(teacher, diffusion(teacher, ddpm_dir), 30, out, batch_size=10, accelerator=accelerator,
                      selection=selection)
    after = SyntheticDataset(out)
    assert torch.equal(after.images, before.images) and torch.equal(after.targets, before.targets)
    assert second["report"] == first["report"]


def test_a_pipeline_retrained_at_the_same_path_is_not_resumed_into(teacher, ddpm_dir, text_to_image_dir, tmp_path,
                                                                 accelerator):
    from diffusers import DDPMPipeline

    shutil.copytree(text_to_image_dir, tmp_path / "t2i")  # the same content elsewhere is the same pipeline
    assert pipeline_fingerprint(load_pipeline(str(tmp_path / "t2i"))) == pipeline_fingerprint(load_pipeline(str(text_to_image_dir)))
    pipeline = tmp_path / "ddpm"
    shutil.copytree(ddpm_dir, pipeline)
    assert diffusion(teacher, pipeline).fingerprint == diffusion(teacher, ddpm_dir).fingerprint
    out = tmp_path / "set"
    generate(teacher, diffusion(teacher, pipeline), 20, out, batch_size=10, accelerator=accelerator, max_rounds=1)
    retrained = DDPMPipeline.from_pretrained(pipeline)
    with torch.no_grad():
        next(retrained.unet.parameters()).add_(0.01)
    retrained.save_pretrained(pipeline)
    with pytest.raises(SynthkdError, match="pipeline_fingerprint"):
        generate(teacher, diffusion(teacher, pipeline), 20, out, batch_size=10, accelerator=accelerator)
    assert (out / shard_name(0)).is_file()  # the shard made by the first pipeline is kept


def test_text_to_image_prompts_per_class(teacher, text_to_image_dir, tmp_path, accelerator):
    names = {str(i): word for i, word in enumerate("zero one two three four five six seven eight nine".split())}
    generator = diffusion(teacher, text_to_image_dir, class_table=names, guidance_scale=2.0, sample_batch_size=5)
    assert generator.conditioning == "text" and generator.aims_at_targets
    assert generator.conditions[3] == "a photo of a three"
    assert generator.output_shape == (3, 16, 16)  # RGB 16x16, adapted to the teacher's 1x8x8
    images = generator.generate(torch.tensor([0, 0, 7]), seed=1)
    assert images.shape == (3, *teacher.input_format.shape)
    # The prompt reaches the pipeline: same seed and noise, other class, other image.
    assert not torch.allclose(images[0], generator.generate(torch.tensor([7]), seed=1)[0])
    manifest = generate(teacher, generator, 10, tmp_path / "set", batch_size=10, accelerator=accelerator)
    assert manifest["counts_per_class"] == [1] * 10  # aimed: targets are the prompted classes
    assert manifest["config"]["conditioning"] == "text"


def test_class_conditional_maps_classes_through_the_table(teacher, tmp_path):
    pipeline = save_class_conditional(tmp_path / "dit")
    table = {str(i): 100 + i for i in range(10)}
    generator = diffusion(teacher, pipeline, class_table=table, steps=2)
    assert generator.conditioning == "class" and generator.conditions == [100 + i for i in range(10)]
    assert generator.generate(torch.tensor([2, 5]), seed=0).shape == (2, *teacher.input_format.shape)


def test_generate_cli_with_diffusion(teacher_dir, ddpm_dir, tmp_path):
    out = tmp_path / "set"
    result = ok("generate", "--teacher", teacher_dir, "--method", "diffusion", "--pipeline", ddpm_dir,
                "--steps", STEPS, "--scheduler", "dpm-solver", "--num-images", 20, "--batch-size", 10,
                "--balance", "--max-tries", 2, "--out", out)
    assert "wrote 20 images in 2 shards" in result.stdout and "wanted" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "diffusion" and manifest["config"]["scheduler"] == "dpm-solver"
    assert manifest["counts_per_class"] == [2] * 10


def test_generate_cli_text_to_image_with_a_class_table_file(teacher_dir, text_to_image_dir, tmp_path):
    table = tmp_path / "names.json"
    table.write_text(json.dumps({str(i): f"digit {i}" for i in range(10)}))
    out = tmp_path / "set"
    ok("generate", "--teacher", teacher_dir, "--method", "diffusion", "--pipeline", text_to_image_dir, "--steps", 2,
       "--class-table", table, "--prompt-template", "a drawing of a {name}", "--guidance-scale", 1.5,
       "--num-images", 10, "--batch-size", 10, "--out", out)
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["class_table"]["7"] == "digit 7" and config["prompt_template"] == "a drawing of a {name}"
    assert config["conditioning"] == "text" and config["pipeline_output_shape"] == [3, 16, 16]


def test_bad_inputs_exit_2(teacher_dir, ddpm_dir, text_to_image_dir, tmp_path):
    base = ["generate", "--teacher", teacher_dir, "--method", "diffusion", "--num-images", 10, "--out", tmp_path / "set"]

    def error(*args):
        return error_line(CliRunner().invoke(main, [str(a) for a in [*base, *args]]))

    assert "not a diffusers pipeline" in error("--pipeline", teacher_dir)
    assert "model_index.json" in error("--pipeline", teacher_dir)
    assert "--pipeline is needed by the diffusion method" in error()
    # Digits classes are called 0-9: no names a prompt could use.
    assert "needs a class name" in error("--pipeline", text_to_image_dir)
    assert "misses teacher classes 2, 3" in error("--pipeline", save_class_conditional(tmp_path / "dit"), "--class-table",
                                                  json.dumps({str(i): i for i in (0, 1, *range(4, 10))}))
    assert "not teacher classes" in error("--pipeline", text_to_image_dir, "--class-table", '{"sandal": "sandal"}')
    assert "distort" in error("--pipeline", save_ddpm(tmp_path / "wide", sample_size=(8, 16)))
    assert "unknown scheduler 'warp'" in error("--pipeline", ddpm_dir, "--scheduler", "warp")
    assert "takes no guidance scale" in error("--pipeline", ddpm_dir, "--guidance-scale", 3)
    assert "--max-tries" in error("--pipeline", ddpm_dir, "--balance", "--max-tries", 0)
    assert not (tmp_path / "set").exists()  # nothing written before the inputs are checked


def test_train_diffusion_cli_saves_a_loadable_ddpm_and_resumes(tmp_path):
    from diffusers import DDPMPipeline

    out = tmp_path / "ddpm"
    args = ["train-diffusion", "--dataset", "digits:train[:96]", "--epochs", 2, "--batch-size", 32, "--image-size", 8,
            "--block-out-channels", "8,16", "--out", out]
    assert "trained 6 steps" in ok(*args).stdout
    pipeline = DDPMPipeline.from_pretrained(out)
    assert pipeline.unet.config.sample_size == 8 and pipeline.unet.config.in_channels == 1
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [record["steps"] for record in history] == [3, 3]
    weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    # Killed after the last checkpoint, before the pipeline was saved: the rerun trains nothing more.
    shutil.rmtree(out / "unet")
    (out / "metrics.json").unlink()
    ok(*args)
    assert json.loads((out / "metrics.json").read_text())["history"] == history
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    odd_size = [str(a) for a in [*args[:-2], "--image-size", 9, "--out", tmp_path / "x"]]
    assert "must be divisible by 2" in error_line(CliRunner().invoke(main, odd_size))


def generate_with_two_ranks(*args: str) -> None:
    """`accelerate launch` two ranks (CPU processes over gloo without a GPU) of `synthkd generate`."""
    cmd = [*launcher(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "synthkd", "generate", *args]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_two_ranks_sample_distinct_shards(teacher_dir, ddpm_dir, tmp_path, accelerator):
    out = tmp_path / "set"
    options = ["--method", "diffusion", "--pipeline", str(ddpm_dir), "--steps", str(STEPS), "--num-images", "40",
               "--batch-size", "10", "--balance", "--max-tries", "3"]
    generate_with_two_ranks("--teacher", str(teacher_dir), *options, "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 0, 1]
    # Seeds come from the shard, not the rank: one process makes the very same set.
    ok("generate", "--teacher", teacher_dir, *options, "--out", tmp_path / "single")
    single, both = SyntheticDataset(tmp_path / "single"), SyntheticDataset(out)
    assert torch.equal(single.images, both.images) and torch.equal(single.targets, both.targets)
    assert single.manifest["report"] == manifest["report"]
    assert len({tuple(both.images[i].flatten()[:8].tolist()) for i in range(0, 40, 10)}) == 4


def test_selection_with_inversion(teacher, tmp_path, accelerator):
    """Selection is the pipeline's, so an aimed, collective generator gets it too."""
    from synthkd.generators.inversion import ActivationInversion, InversionSettings

    manifest = generate(teacher, ActivationInversion(teacher, InversionSettings(iterations=3)), 20, tmp_path / "set",
                        batch_size=10, accelerator=accelerator, selection=SelectionSettings(balance=True, max_tries=3))
    report = manifest["report"]
    assert manifest["counts_per_class"] == [2] * 10 == report["wanted"]
    assert [a + f for a, f in zip(report["accepted"], report["filled"])] == report["wanted"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_two_ranks_invert_with_balancing_in_lockstep(teacher_dir, tmp_path):
    """Inversion all-reduces every step: ranks must draw in step even when one needs more tries."""
    out = tmp_path / "set"
    generate_with_two_ranks("--teacher", str(teacher_dir), "--num-images", "30", "--batch-size", "10",
                            "--iterations", "3", "--balance", "--max-tries", "3", "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 0]
    assert manifest["counts_per_class"] == [3] * 10 and manifest["report"]["tries"] >= 3
