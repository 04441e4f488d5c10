"""Entry point: `python app.py` (what `make demo` and Hugging Face Spaces run).

Settings come from the environment: CHATTERBOX_WEIGHTS (auto, hub, local:DIR, random,
tiny), CHATTERBOX_DEVICE (auto, cuda, mps, cpu), CHATTERBOX_DEMO_CACHE, and Gradio's own
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860).
"""

import logging

from chatterbox_demo.ui import build_demo, launch

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

demo = build_demo()

if __name__ == "__main__":
    launch(demo)
