"""MuseTalk v1.5 neural backend: Whisper-tiny features -> one-step UNet + VAE decode."""
