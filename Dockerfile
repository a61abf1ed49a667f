# lcs-serve: the HTTP service with the default model (models/structured_line.safetensors) inside.
#
#   docker build -t lcs-serve .                       # normal: python:3.11-slim, CPU torch from its index
#   docker run --rm -p 8000:8000 lcs-serve
#
# Offline (no registry, no network inside `docker build`): a local base image and wheels downloaded on
# the host; deploy/README.md has the steps.
#   docker build --build-arg BASE_IMAGE=lcs-base --build-arg WHEELS=deploy/docker/wheels -t lcs-serve .
#
# The same image trains: docker run ... --entrypoint python3 lcs-serve -m training train CONFIG key=value
# No BuildKit-only syntax, so the legacy builder works too.

ARG BASE_IMAGE=python:3.11-slim

# -- build: a virtual environment with the project and its runtime dependencies ------------------------
FROM ${BASE_IMAGE} AS build
# a directory of wheels inside the build context; if it holds any *.whl, pip installs from it alone
ARG WHEELS=deploy/docker/wheels
# the CPU build of torch: PyPI's Linux wheel pulls several GB of CUDA libraries the service never uses
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
COPY ${WHEELS} /wheels/
# The dependencies first, from pyproject.toml alone, at the tested versions of constraints.txt: editing a
# source file rebuilds only the layers below, not this one with torch.
# No bytecode (--no-compile, PYTHONDONTWRITEBYTECODE): compiling the venv made the image 1.36 GB instead of
# 1.18 and a read-only container ready after 6.3-6.7 s instead of 7.5-10.7 (5 starts each, 2 busy cores):
# about as much time as pulling the extra 180 MB takes on a new node.
COPY pyproject.toml constraints.txt /src/
RUN python3 -m venv /opt/venv \
 && python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /src/requirements.txt \
 && if ls /wheels/*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install --no-compile --no-index --find-links /wheels -c /src/constraints.txt -r /src/requirements.txt; \
    else \
        /opt/venv/bin/pip install --no-compile --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
        && /opt/venv/bin/pip install --no-compile -c /src/constraints.txt -r /src/requirements.txt; \
    fi
COPY README.md LICENSE /src/
COPY lcs /src/lcs
COPY training /src/training
COPY service /src/service
RUN if ls /wheels/*.whl >/dev/null 2>&1; then links="--no-index --find-links /wheels"; else links=; fi \
 && /opt/venv/bin/pip install --no-compile --no-deps $links /src \
 && /opt/venv/bin/python -c "import torch, service.app, training.train; print('torch', torch.__version__)" \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# -- runtime: the venv, the model, a non-root user ------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# a numeric user written straight into /etc/passwd: works on bases without useradd (debootstrap minbase)
RUN echo "lcs:x:10001:10001:lcs-serve:/home/lcs:/usr/sbin/nologin" >> /etc/passwd \
 && echo "lcs:x:10001:" >> /etc/group \
 && mkdir -p /home/lcs /models \
 && chown 10001:10001 /home/lcs /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY configs /app/configs
COPY models/structured_line.safetensors /app/models/structured_line.safetensors
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/lcs \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LCS_HOST=0.0.0.0 \
    LCS_PORT=8000 \
    LCS_CHECKPOINT=/app/models/structured_line.safetensors
USER 10001:10001
EXPOSE 8000
# /models: a volume for checkpoints trained in a container (the compose `train` profile writes there)
VOLUME ["/models"]
# readiness, not liveness: unhealthy while the models are built and while draining (no curl in the image);
# it asks the address the service binds (LCS_HOST), loopback when that is every address (IPv6's for ::, since
# the service's IPv6 sockets are IPv6-only)
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; h = os.environ.get('LCS_HOST', '0.0.0.0'); h = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = '[%s]' % h if ':' in h else h; u.urlopen('http://%s:%s/readyz' % (h, os.environ.get('LCS_PORT', '8000')), timeout=2)"]
# SIGTERM: readiness turns 503 at once, queued and in-flight requests finish (LCS_DRAIN_SECONDS), then exit
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "service"]
