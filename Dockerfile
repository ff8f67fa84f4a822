# Multi-stage image for vla-inference: the runtime of `make run` (no test or lint tools).
#   docker build -t vla-inference .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 -e VLA_DEVICE=cuda \
#     -v /models/pi0:/models/pi0:ro -e VLA_MODEL_PATH=/models/pi0 vla-inference
# Without VLA_MODEL_PATH the embedded default is served (pi0 trained in MetaWorld simulation).

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# Building the package generates the gRPC code (setup.py); grpcio-tools is a build requirement only
# and does not reach the runtime image.
RUN pip install .

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 vla
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VLA_HOST=0.0.0.0 \
    VLA_METRICS_HOST=0.0.0.0 \
    VLA_GRPC_PORT=50051 \
    VLA_METRICS_PORT=9090
USER 10001
WORKDIR /home/vla
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["vla-inference", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["vla-inference"]
CMD ["serve"]
