# The Batchery service image: the core, and any extras named at build time.
#   docker build -t batchery .
#   docker build -t batchery:models --build-arg EXTRAS=postgres,s3,embeddings .
#   docker run --rm -v batchery-data:/data --entrypoint batchery batchery \
#       keys create --keys-file /data/keys.yaml --project team-a --role admin
#   docker run -p 8000:8000 -v batchery-data:/data batchery --keys-file /data/keys.yaml
FROM python:3.11-slim AS build
ARG EXTRAS=postgres,s3
# llama-cpp-python compiles llama.cpp when the `llama` extra is asked for.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY batchery ./batchery
RUN python -m venv /opt/batchery \
    && /opt/batchery/bin/pip install --no-cache-dir --upgrade pip \
    && case ",${EXTRAS}," in *,embeddings,*) \
         /opt/batchery/bin/pip install --no-cache-dir torch==2.13.0 \
           --index-url https://download.pytorch.org/whl/cpu ;; esac \
    && /opt/batchery/bin/pip install --no-cache-dir ".[${EXTRAS}]"

FROM python:3.11-slim
COPY --from=build /opt/batchery /opt/batchery
ENV PATH=/opt/batchery/bin:$PATH
RUN useradd --create-home --uid 10001 batchery && mkdir /data && chown batchery /data
USER batchery
VOLUME /data
EXPOSE 8000
# Listening beyond loopback needs a keys file (`--keys-file`, as above), or `--insecure` on
# a private network: `serve` refuses to start otherwise, and says so (docs/security.md).
ENTRYPOINT ["batchery", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
