# The cdr-streamer image: one image for both `cdr-streamer run` and `cdr-streamer simulate`
# (see docker-compose.yml). Built from the checkout, with the tested pins of constraints.txt.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# In a container the metrics endpoint must be reachable from outside it: all
# interfaces, unless [metrics] host says otherwise (a plain install: loopback).
ENV CDR_METRICS_HOST=0.0.0.0

WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY streamer/ streamer/
COPY schemas/ schemas/
RUN pip install -c constraints.txt . && rm -rf /src

# Never root at run time; the cursor lives on a volume at /var/lib/cdr-streamer.
RUN useradd --system --uid 10001 --home-dir /var/lib/cdr-streamer --shell /usr/sbin/nologin cdr \
    && install -d -o cdr -g cdr -m 0750 /var/lib/cdr-streamer
USER cdr
WORKDIR /var/lib/cdr-streamer

# 8080: the simulator's billing feed; 9108: the streamer's Prometheus metrics.
EXPOSE 8080 9108
CMD ["cdr-streamer", "--help"]
