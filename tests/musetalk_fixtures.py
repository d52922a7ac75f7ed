"""Tiny random-weight MuseTalk models written in the REAL file layout, for CPU tests.

The architectures are of the same family as MuseTalk v1.5 (8 -> 4 channel UNet with 384-d
cross-attention, a 4-block VAE that maps 256x256 to 4x32x32, a Whisper encoder with d_model
384 and 4 layers -> 5 hidden states) but a few MB in size, so the real loader loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "in_channels": 8,
    "out_channels": 4,
    "cross_attention_dim": 384,
    "block_out_channels": [16, 32],
    # Attention only at 16x16 (and the mid block): attention over 32x32 tokens would make the
    # tiny model slower than real time on a 2-core CPU, and the tests stream in real time.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "sample_size": 32,
}


def build_tiny_models(root: Path, seed: int = 0) -> Path:
    """Write tiny MuseTalk weights under `root` (musetalkV15/, sd-vae/, whisper/); return root."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    root = Path(root)
    unet_dir = root / "musetalkV15"
    unet_dir.mkdir(parents=True, exist_ok=True)
    (unet_dir / "musetalk.json").write_text(json.dumps(TINY_UNET_CONFIG, indent=2))
    torch.save(UNet2DConditionModel.from_config(TINY_UNET_CONFIG).state_dict(), unet_dir / "unet.pth")

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[4, 8, 8, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=256,
        mid_block_add_attention=False,
    )
    vae.save_pretrained(root / "sd-vae", safe_serialization=False)

    config = WhisperConfig(
        vocab_size=128,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=512,
        decoder_layers=1,
        decoder_attention_heads=6,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    whisper_dir = root / "whisper"
    whisper_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(whisper_dir)
    # openai/whisper-tiny ships a WhisperForConditionalGeneration state dict ("model.encoder...")
    # as pytorch_model.bin; transformers 5 save_pretrained writes only safetensors, so save it here.
    torch.save(WhisperForConditionalGeneration(config).state_dict(), whisper_dir / "pytorch_model.bin")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")
    return root
