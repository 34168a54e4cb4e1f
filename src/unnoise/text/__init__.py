"""Text conditioning: frozen encoders that turn prompts into token states, a mask and a pooled vector."""
