#!/usr/bin/env bash
# Makes the three reference clips in this folder offline with espeak-ng and sox
# (Debian: apt-get install espeak-ng sox). Re-running it rewrites them.
# Each clip is mono 16-bit WAV at 24 kHz, under 10 s, in a clearly different voice.
set -euo pipefail
cd "$(dirname "$0")"

make_voice() {  # name, espeak voice, pitch (0-99), words per minute, text
    espeak-ng -v "$2" -p "$3" -s "$4" -w "/tmp/$1.raw.wav" "$5"
    # Resample to S3Gen's 24 kHz, mono, and trim leading/trailing silence.
    sox "/tmp/$1.raw.wav" -r 24000 -c 1 -b 16 "$1.wav" silence 1 0.05 0.5% reverse silence 1 0.05 0.5% reverse
    rm -f "/tmp/$1.raw.wav"
}

make_voice narrator-low "en-us+m3" 30 150 \
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each step as the sea grew dark below him."
make_voice bright-high "en-gb+f4" 70 170 \
    "Good morning! Today we will bake a lemon cake, paint the garden fence, and still be home in time for tea."
make_voice calm-mid "en-us+f2" 50 135 \
    "Please breathe in slowly, hold it for a moment, and let the air out gently while your shoulders relax."
