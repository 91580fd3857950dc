#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels the GPU acceptance run installs on the GPU image, which has torch 2.11,
# transformers 5.17, accelerate 1.15 and the usual scientific stack but lacks trl, datasets and deepspeed (and, of
# their needs, dill, multiprocess, hjson and pydantic). Versions are the ones the CPU test suite runs with.
# bitsandbytes is left out on purpose: its wheel alone is 41 MiB of the 64 MiB that may travel, and the acceptance
# run has no QLoRA section.
#   bash benchmarks/fetch_gpu_wheels.sh          # run in the repository root, with the project's venv active
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl

BINARY=(
  trl==1.16.0 datasets==5.2.0 peft==0.21.2        # peft pinned too: the image's version is not known here
  dill==0.4.1 multiprocess==0.70.19                # datasets
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0                        # pydantic 2.14 needs >= 4.14.1
)
for spec in "${BINARY[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
# DeepSpeed publishes only an sdist. Built without ops (DS_BUILD_OPS=0) it is a pure-Python py3-none-any wheel that
# JIT-compiles ops on first use; the ZeRO-2/3 runs with torch's AdamW need none. setup.py imports torch, hence
# --no-build-isolation (the venv's CPU torch is only read for version information).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

ls -1 .whl
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $((wheels / 1024)) KiB; working tree that travels: $((tree / 1024)) KiB; together $(((wheels + tree) / 1048576)) MiB of 64"
if (( wheels + tree > 64 * 1048576 )); then echo "over the 64 MiB that may travel" >&2; exit 1; fi
