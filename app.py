"""Entry point: `python app.py` (what `make demo` and Hugging Face Spaces run).

Settings come from the environment: CHATTERBOX_WEIGHTS (auto, hub, local:DIR, random,
tiny), CHATTERBOX_DEVICE (auto, cuda, mps, cpu), CHATTERBOX_DEMO_CACHE, CHATTERBOX_API_KEY
(when set, the /v1 API needs it as a bearer token), and Gradio's own
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860).
"""

import ctypes
import ctypes.util
import logging

from chatterbox_demo.api import build_router
from chatterbox_demo.ui import build_demo, launch


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own heap arena; a server whose requests
    run on a pool of worker threads then grows by an arena per thread (the soak test saw
    the resident size climb under load). Two arenas keep it flat. No-op off glibc."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).mallopt(-8, arenas)  # -8 is M_ARENA_MAX
        except (OSError, AttributeError):
            pass


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

demo = build_demo()

if __name__ == "__main__":
    limit_malloc_arenas()
    launch(demo, routers=[build_router()])
