"""Files, below every layer: atomic writes (no half-written file where a good one was) and weights-only
reads (nothing in a shared file runs)."""
