# The cluster image jobs/rayjob.yaml runs: Ray's GPU image at the version pyproject.toml pins, plus this
# package (torch comes from PyPI as a CUDA build). Build and push it where your cluster pulls from:
#   docker build -t REGISTRY/unclip-batch:0.1.0 . && docker push REGISTRY/unclip-batch:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/unclip-batch
COPY --chown=ray:users pyproject.toml README.md LICENSE ./
COPY --chown=ray:users unclip_batch ./unclip_batch
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir . && unclip-batch --help > /dev/null
ENV HF_HUB_DISABLE_TELEMETRY=1
