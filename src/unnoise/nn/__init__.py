"""The denoising network: layers, the text-conditioned UNet and its presets."""
