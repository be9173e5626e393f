# The lent GPU machine has torch 2.11, triton, transformers 5.17 and no package registry: what the benchmarks need
# beyond its image travels as wheels, at the versions this checkout's .venv holds (transformers 5.25 and what it
# needs, datasets, torchao, liger-kernel, and the serve extra's server and client).
#
#   here:  bash benchmarks/gpu_wheels.sh download        # fills .whl/ (add /.whl/ to .git/info/exclude; carry .whl)
#   there: source benchmarks/gpu_wheels.sh install       # first in each command: wheels into /tmp/site, src on the path

GPU_WHEEL_PACKAGES=(
    transformers huggingface_hub kernels hf-xet httpx2 httpcore2 truststore tomlkit click
    datasets dill multiprocess torchao liger-kernel
    fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn openai jiter
)

download_gpu_wheels() {
    local pins=() package version
    for package in "${GPU_WHEEL_PACKAGES[@]}"; do
        version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$package'))") || return 1
        pins+=("$package==$version")
    done
    mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${pins[@]}"
    du -sh .whl
}

install_gpu_wheels() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >/dev/null || { echo "installing the carried wheels failed"; return 1; }
    export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name())"
}

case "${1:-}" in
    download) download_gpu_wheels ;;
    install) install_gpu_wheels ;;
    *) echo "usage: bash benchmarks/gpu_wheels.sh download | source benchmarks/gpu_wheels.sh install" >&2 ;;
esac
