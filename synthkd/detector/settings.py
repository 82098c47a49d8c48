"""The detector's settings, the one place their defaults, checks and help live: the options of
``synthkd calibrate`` / ``synthkd detect`` / ``synthkd evaluate --detector`` and the ``detector:``
section of ``synthkd run`` are derived from these classes (field name = YAML key, flag =
``--field-name``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..data import check_dataset
from ..settings import Settings, refusal, setting
from .attacks import ATTACKS
from .conformal import alpha_problem
from .densities import DENSITIES
from .detector import batchnorm_weight_problem, parts_problem, score_names


def fraction_problem(value: float) -> str | None:
    return None if 0 < value < 1 else f"is a fraction and must lie in (0, 1), got {value:g}"


def smoothing_problem(value: float) -> str | None:
    return None if value >= 0 else f"expected 0 (off) or a positive noise variance, got {value:g}"


ALPHA_HELP = "False-alarm rate: flag inputs with p-value below it."
SCORE_HELP = ("What inputs are flagged by: one score part (the density, a confidence, a class-conditional score) "
              "or a combination rule of the conformal p-values of --parts (README: What it flags by).")
PARTS_HELP = "The score parts a combination rule combines."
CALIBRATION_VIEWS = ("plain", "crop", "mixup", "crop+mixup")
OOD_ALIASES = {  # short names for the out-of-distribution sets available everywhere
    "digits": ("digits:test",),
    "noise": ("noise:gaussian", "noise:uniform"),
    "flips": ("fashion-mnist:test|vflip",),
    "inversions": ("fashion-mnist:test|invert",),
}


@dataclass
class CalibrationSettings(Settings):
    """How ``synthkd calibrate`` fits and calibrates a detector (the data, the seed and the
    BatchNorm layers are given beside these)."""

    density: str = setting("gmm", help="Density model of the features.", choices=DENSITIES.names)
    alpha: float = setting(0.05, help=ALPHA_HELP, check=alpha_problem)
    layer: str | None = setting(
        None, help="Module path of the network whose input is the feature (default: the last nn.Linear).")
    components: int | None = setting(None, help="Gaussian mixture components (default: chosen by BIC).", at_least=1)
    holdout: float = setting(0.2, help="Fraction kept for the calibration scores.", check=fraction_problem)
    batchnorm_weight: float = setting(
        0.0, check=batchnorm_weight_problem,
        help="Weight of the inputs' deviation from the model's BatchNorm statistics in the score (0: off; "
             "2 on Fashion-MNIST flags more adversarial inputs, fewer mistakes).")
    smoothing: float = setting(
        0.0, check=smoothing_problem,
        help="Widen the density by Gaussian noise of this variance (standardised feature units; 0: off); "
             "about 0.1 for synthetic data, whose features spread less than real ones (README).")
    score: str = setting("density", help=SCORE_HELP, choices=score_names)
    parts: list[str] = setting(default_factory=lambda: ["density", "msp"], help=PARTS_HELP, check=parts_problem)
    calibration_views: str = setting(
        "plain", choices=CALIBRATION_VIEWS,
        help="Calibrate on the held-out images as they are (plain) or on perturbed views of them: crop "
             "(pad-and-crop), mixup (each blended with another, weight of the partner up to 0.5), or both; "
             "perturbed synthetic views score lower, which lowers false alarms on real inputs (README).")


def _ood_problem(names: list[str]) -> str | None:
    """Why an ``ood`` entry names no dataset (checked before anything runs), or None."""
    for spec in (spec for name in names for spec in OOD_ALIASES.get(name, (name,))):
        problem = refusal(check_dataset)(spec)
        if problem:
            return problem
    return None


@dataclass
class DetectorEvaluationSettings(Settings):
    """Which failure sources ``synthkd evaluate --detector`` scores the detector on."""

    ood: list[str] = setting(
        default_factory=list, check=_ood_problem,
        help=f"Out-of-distribution dataset specs ({', '.join(OOD_ALIASES)} are short names).")
    attacks: list[str] = setting(default_factory=list, help="Attacks on the dataset.", choices=ATTACKS.names)
    epsilon: float = setting(0.1, help="L-inf attack budget in [0,1] pixel units.", positive=True)
    pgd_steps: int = setting(10, help="Steps of the PGD attack.", positive=True)
    limit: int | None = setting(None, help="At most this many inputs per source.", positive=True)

    def ood_specs(self) -> list[str]:
        """The out-of-distribution dataset specs, short names expanded, each once."""
        return list(dict.fromkeys(spec for name in self.ood for spec in OOD_ALIASES.get(name, (name,))))


@dataclass
class DetectSettings(Settings):
    """How ``synthkd detect`` flags inputs with a calibrated detector."""

    alpha: float | None = setting(None, help="False-alarm rate (default: the detector's).", check=alpha_problem)
    score: str | None = setting(None, help=SCORE_HELP + " Default: the detector's.", choices=score_names)
    parts: list[str] | None = setting(None, help=PARTS_HELP + " Default: the detector's.",
                                      check=lambda parts: parts_problem(parts) if parts else None)
    batch_size: int = setting(512, help="Inputs per batch.", positive=True)


CALIBRATION_KEYS = tuple(spec.name for spec in fields(CalibrationSettings))
