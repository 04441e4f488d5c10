"""Chatterbox TTS demo: voice cloning, synthesis and side-by-side optimization benchmarks."""
