"""Training data: captioned images, built in (procedural shapes) or read from a folder."""
