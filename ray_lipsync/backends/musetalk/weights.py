"""MuseTalk v1.5 weights: check the user-supplied files, load the models once per process.

Layout under `settings.models_dir` (MuseTalk's own):

    musetalkV15/musetalk.json, musetalkV15/unet.pth        UNet2DConditionModel (8 -> 4 ch)
    sd-vae/config.json, sd-vae/diffusion_pytorch_model.bin  AutoencoderKL (sd-vae-ft-mse)
    whisper/config.json, whisper/pytorch_model.bin,
    whisper/preprocessor_config.json                        openai/whisper-tiny

`check_weights` builds each architecture from its json config on the meta device (no memory,
no time) and compares it tensor by tensor with the checkpoint, so a wrong or truncated file is
reported before anything is loaded. `shared_models` keeps one loaded copy per process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping

import torch

from ray_lipsync.errors import DeviceError, WeightsError

if TYPE_CHECKING:
    from ray_lipsync.config import Settings

log = logging.getLogger(__name__)

VAE_SCALE = 0.18215
PARTS = ("unet", "vae", "whisper")

UNET_CONFIG = "musetalkV15/musetalk.json"
UNET_WEIGHTS = "musetalkV15/unet.pth"
VAE_CONFIG = "sd-vae/config.json"
VAE_WEIGHTS = "sd-vae/diffusion_pytorch_model.bin"
WHISPER_CONFIG = "whisper/config.json"
WHISPER_WEIGHTS = "whisper/pytorch_model.bin"
WHISPER_PREPROCESSOR = "whisper/preprocessor_config.json"

FILES: dict[str, tuple[str, ...]] = {
    "unet": (UNET_CONFIG, UNET_WEIGHTS),
    "vae": (VAE_CONFIG, VAE_WEIGHTS),
    "whisper": (WHISPER_CONFIG, WHISPER_WEIGHTS, WHISPER_PREPROCESSOR),
}

WHERE = (
    "MuseTalk publishes these files: see the 'Download weights' section of the MuseTalk README "
    "(github.com/TMElyralab/MuseTalk) - musetalkV15/{musetalk.json,unet.pth} from Hugging Face "
    "TMElyralab/MuseTalk, sd-vae/ from stabilityai/sd-vae-ft-mse, whisper/ from "
    "openai/whisper-tiny. Put them under the models directory (settings.models_dir) exactly in "
    "that layout; see models/README.md."
)


def full_unet_config() -> dict[str, Any]:
    """The MuseTalk v1.5 UNet architecture (SD-1.x with 8 input channels, 384-d cross-attention)."""
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 384,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 8,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }


@dataclass(frozen=True)
class MuseTalkModels:
    """Loaded models (eval mode, on `device` in `dtype`); parts not requested are None."""

    device: torch.device
    dtype: torch.dtype
    unet: Any = None  # diffusers UNet2DConditionModel
    vae: Any = None  # diffusers AutoencoderKL
    whisper: Any = None  # transformers WhisperEncoder
    feature_extractor: Any = None  # transformers WhisperFeatureExtractor


def _parts(parts: Collection[str]) -> tuple[str, ...]:
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown model parts {bad}; choose from {PARTS}")
    return tuple(p for p in PARTS if p in parts)


def _meta_state(part: str, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """State dict of the architecture described by `config`, built without allocating memory."""
    with torch.device("meta"):
        if part == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config).state_dict()
        if part == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config).state_dict()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(WhisperConfig(**config)).state_dict()


def _checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict (found {type(state).__name__}). {WHERE}")
    return state


def _whisper_encoder_view(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder tensors of a Whisper checkpoint, keyed as in WhisperEncoder (prefix stripped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("model.encoder.", "encoder."):
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
                break
    return out


def _compare(
    name: str, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], strict: bool
) -> list[str]:
    problems: list[str] = []
    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(f"{name}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    if strict:
        extra = [k for k in found if k not in expected]
        if extra:
            problems.append(f"{name}: {len(extra)} unexpected tensors, e.g. {extra[:5]}")
    for key, want in expected.items():
        got = found.get(key)
        if got is None:
            continue
        if not isinstance(got, torch.Tensor):
            problems.append(f"{name}: {key} is a {type(got).__name__}, not a tensor")
        elif tuple(got.shape) != tuple(want.shape):
            problems.append(
                f"{name}: {key} has shape {tuple(got.shape)}, the config expects {tuple(want.shape)}"
            )
        elif want.is_floating_point() and not got.is_floating_point():
            problems.append(f"{name}: {key} has dtype {got.dtype}, expected a floating-point dtype")
    return problems


def _check_part(root: Path, part: str) -> list[str]:
    config_file, weights_file = (root / f for f in FILES[part][:2])
    try:
        config = json.loads(config_file.read_text())
        expected = _meta_state(part, config)
    except (OSError, ValueError, TypeError) as exc:
        return [f"{config_file}: cannot build the architecture from it ({exc})"]
    try:
        found = _checkpoint(weights_file)
    except WeightsError as exc:
        return [str(exc)]
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        return [f"{weights_file}: cannot be read as a PyTorch state dict ({exc})"]
    if part == "whisper":
        return _compare(str(weights_file), expected, _whisper_encoder_view(found), strict=False)
    return _compare(str(weights_file), expected, found, strict=True)


def check_weights(models_dir: str | Path, parts: Collection[str] = PARTS) -> None:
    """Raise WeightsError listing every missing file and every tensor mismatch of `parts`."""
    root = Path(models_dir)
    chosen = _parts(parts)
    missing = [str(root / f) for p in chosen for f in FILES[p] if not (root / f).is_file()]
    problems: list[str] = []
    for part in chosen:
        if all((root / f).is_file() for f in FILES[part]):
            problems.extend(_check_part(root, part))
    if missing or problems:
        lines = []
        if missing:
            lines.append("missing MuseTalk weight files:")
            lines.extend(f"  - {m}" for m in missing)
        if problems:
            lines.append("weight files that do not match their configs:")
            lines.extend(f"  - {p}" for p in problems)
        lines.append(WHERE)
        raise WeightsError("\n".join(lines))


def declared_gpus() -> str | None:
    """CUDA_VISIBLE_DEVICES when it names devices (Ray sets it for `num_gpus` actors), else None."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return value if value and value not in ("-1", "NoDevFiles") else None


def _cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, or None when it can."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install the CUDA build of torch"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no driver, or no device visible to this process)"
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError as exc:
        return f"allocating on CUDA failed: {exc}"
    return None


def resolve_device(requested: str = "auto") -> torch.device:
    """The device for `musetalk.device` (see MuseTalkConfig); DeviceError when it cannot be used.

    A GPU that was asked for or declared to this process (CUDA_VISIBLE_DEVICES) but is not
    usable fails loudly: silently serving a GPU's load from the CPU would run at a few frames/s.
    """
    if requested not in ("auto", "cuda", "cpu"):
        raise DeviceError(f"unknown musetalk.device {requested!r}; choose auto, cuda or cpu")
    if requested == "cpu":
        log.warning("musetalk runs on the CPU (musetalk.device = cpu): expect a few frames/s per replica")
        return torch.device("cpu")
    problem = _cuda_problem()
    if problem is None:
        return torch.device("cuda")
    declared = declared_gpus()
    if requested == "cuda" or declared:
        why = "musetalk.device = cuda" if requested == "cuda" else f"CUDA_VISIBLE_DEVICES={declared}"
        raise DeviceError(
            f"a GPU is expected ({why}) but CUDA is not usable: {problem}. Fix the CUDA install, or "
            "set musetalk.device = cpu to run on the CPU on purpose (a few frames/s)"
        )
    log.warning("no usable CUDA (%s): musetalk runs on the CPU, a few frames/s per replica", problem)
    return torch.device("cpu")


def default_dtype(device: torch.device, fp16: bool = True) -> torch.dtype:
    """fp16 on CUDA (when `fp16`), fp32 everywhere else."""
    return torch.float16 if (fp16 and torch.device(device).type == "cuda") else torch.float32


def load_models(
    models_dir: str | Path,
    device: str | torch.device,
    dtype: torch.dtype,
    parts: Collection[str] = PARTS,
) -> MuseTalkModels:
    """Check, then load `parts` of MuseTalk v1.5 onto `device` in `dtype` (eval mode)."""
    root = Path(models_dir)
    chosen = _parts(parts)
    check_weights(root, chosen)
    device = torch.device(device)
    loaded: dict[str, Any] = {}
    if "unet" in chosen:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(json.loads((root / UNET_CONFIG).read_text()))
        state = torch.load(root / UNET_WEIGHTS, map_location="cpu", weights_only=True)
        unet.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state, strict=True)
        loaded["unet"] = unet.to(device=device, dtype=dtype).eval()
    if "vae" in chosen:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(root / "sd-vae", use_safetensors=False)
        loaded["vae"] = vae.to(device=device, dtype=dtype).eval()
    if "whisper" in chosen:
        from transformers import WhisperFeatureExtractor, WhisperModel

        whisper = WhisperModel.from_pretrained(root / "whisper", use_safetensors=False)
        loaded["whisper"] = whisper.get_encoder().to(device=device, dtype=dtype).eval()
        loaded["feature_extractor"] = WhisperFeatureExtractor.from_pretrained(root / "whisper")
    log.info("loaded MuseTalk %s from %s on %s (%s)", "+".join(chosen), root, device, dtype)
    return MuseTalkModels(device=device, dtype=dtype, **loaded)


@functools.lru_cache(maxsize=4)
def _shared(root: str, device: str, dtype: torch.dtype, parts: tuple[str, ...]) -> MuseTalkModels:
    return load_models(root, device, dtype, parts)


def shared_models(
    models_dir: str | Path,
    device: str | torch.device,
    dtype: torch.dtype,
    parts: Collection[str] = PARTS,
) -> MuseTalkModels:
    """`load_models`, but loaded once per process for each (dir, device, dtype, parts)."""
    return _shared(str(Path(models_dir).resolve()), str(torch.device(device)), dtype, _parts(parts))


def models_for(settings: "Settings", parts: Collection[str], device: str | torch.device | None = None) -> MuseTalkModels:
    """The process's shared `parts` for `settings` on `device` (default: `musetalk.device`)."""
    device = torch.device(device) if device is not None else resolve_device(settings.musetalk.device)
    return shared_models(settings.models_dir, device, default_dtype(device, settings.musetalk.fp16), parts)
