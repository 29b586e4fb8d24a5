#!/usr/bin/env bash
# Run here, before the one device call of benchmarks/gpu_session.sh: puts what the GPU machine
# needs and may lack into two ignored folders that the call carries (about 17 MB of its 64 MiB).
#   .refsrc/{core,training}  the reference's sources (from the fetched mirrors)
#   .devwheels/              wheels of the Python packages our side and the reference import
#                            beside jax, jaxlib, numpy and torch (which such machines have): flax,
#                            optax and their imports, einops; binary ones for CPython 3.10-3.13.
#                            gpu_session.sh installs one only where its import fails there.
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".refsrc", ".devwheels"],
#           timeout_s=560), and give_back.
set -euo pipefail
MIRRORS=${MIRRORS:-/work/.mirror}
rm -rf .refsrc .devwheels
mkdir -p .refsrc/core .refsrc/training .devwheels
git --git-dir="$MIRRORS/danny-mio+fluxflow-core/repo" archive HEAD | tar -x -C .refsrc/core
git --git-dir="$MIRRORS/danny-mio+fluxflow-training/repo" archive HEAD | tar -x -C .refsrc/training
# the versions this repository is tested with (pip show), pure Python
python3 -m pip download -q --no-deps --only-binary=:all: -d .devwheels \
    "flax==$(python3 -c 'import flax; print(flax.__version__)')" \
    "optax==$(python3 -c 'import optax; print(optax.__version__)')" \
    absl-py etils rich pygments typing_extensions cloudpickle filelock einops ml_collections
for py in 310 311 312 313; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 -d .devwheels msgpack pyyaml safetensors
done
du -sh .refsrc .devwheels
