"""Evaluation: ShapesEval, an exact prompt-alignment benchmark on the built-in shapes grammar."""
