#!/usr/bin/env bash
# Fetch, here, the wheels the lent GPU machine lacks, into .whl/ (git-ignored), so that
# docs/experiments/gpu_check.sh can run there: that machine reaches no registry. Its image
# has Python 3.12, torch 2.11, numpy 2, huggingface_hub, safetensors, einops, scipy, numba,
# scikit-learn, onnx, peft, psutil, matplotlib and pytest (/work/.library/device/KINDS.md);
# everything below is what chatterbox-tts and this package import beyond that, at the
# versions requirements.txt installs here. transformers and tokenizers travel too: the image's
# transformers is a later 5.x than chatterbox-tts pins, and the fast decoder reaches into
# its Llama internals. gradio, torchao, pykakasi and spacy-pkuseg stay behind (the web page,
# t3-int8-wo and the Japanese/Chinese tokenizers are not part of the GPU check).
#
# Run from the repository root, after `make install` (its .venv makes the clips below, or
# name another Python in PYTHON): bash docs/experiments/gpu_wheels.sh [PYTHON_VERSION] [DIR]
# The defaults (3.12, .whl) are the GPU machine's; 3.11 fetches the same set for a Python
# like this machine's, to try the install here first.
set -euo pipefail
pyver=${1:-3.12}
dest=${2:-.whl}
wheels=(
  chatterbox-tts==0.1.7 transformers==5.2.0 tokenizers==0.22.2 diffusers==0.29.0
  importlib-metadata==10.2.0 librosa==0.11.0 audioread==3.1.0 soxr==1.1.0
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 decorator==5.3.2 pooch==1.9.0
  platformdirs==4.14.9 s3tokenizer==0.3.0 conformer==0.3.2 resemble-perth==1.0.1
  omegaconf==2.4.0
)
platforms=()
for tag in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
           manylinux_2_34 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp "${platforms[@]}" -d "$dest" "${wheels[@]}"
# The GPU machine has no espeak-ng either: the fine-tuning test's clips travel along.
"${PYTHON:-.venv/bin/python}" -c "import sys; from chatterbox_demo.speaker_data import \
make_espeak_dataset; make_espeak_dataset(sys.argv[1], 8)" "$dest/clips"
du -sh "$dest"
