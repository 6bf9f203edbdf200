# sambaproxy: an OpenAI-compatible gateway to SambaNova Cloud.
#   docker build -t sambaproxy .
#   docker run -p 8666:8666 --env-file .env -v sambaproxy-token:/data sambaproxy
#
# Two stages: the builder installs the pinned, pure-Python dependencies into a
# venv; the final stage is distroless Python (no shell, no package manager) and
# takes only the venv's site-packages, put on PYTHONPATH. That works across the
# two interpreters (the builder's and Debian 13's python3.13, the same 3.13 ABI)
# because every dependency is pure Python: no compiled extension is copied.

FROM python:3.13-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# No pip inside the venv: the builder's pip installs into it, so the copied
# site-packages holds the runtime dependencies and nothing else.
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv --without-pip /opt/venv \
 && python3 -m pip --python /opt/venv/bin/python install --no-cache-dir -r /tmp/requirements.txt \
 && mkdir -p /data && chown 1001:1001 /data && chmod 0700 /data

FROM gcr.io/distroless/python3-debian13
ARG VERSION=dev
LABEL org.opencontainers.image.title="sambaproxy" \
      org.opencontainers.image.description="OpenAI-compatible gateway to SambaNova Cloud (HTTP/1.1 and HTTP/2, streaming)" \
      org.opencontainers.image.version="${VERSION}"
ENV PYTHONPATH=/opt/venv/lib/python3.13/site-packages
COPY --from=builder /opt/venv/lib/python3.13/site-packages /opt/venv/lib/python3.13/site-packages
# The token cache lives here; owned by the runtime user so it can write it (mode 0600).
COPY --from=builder --chown=1001:1001 /data /data
WORKDIR /app
# Only the application: the top-level modules and the status page (tests, .env
# and the rest are kept out by .dockerignore).
COPY *.py status.html /app/
# Distroless ships the standard library without bytecode (no Debian postinst
# runs), so every start and every healthcheck would compile ~130 modules again
# (~0.7 s). Importing the app once here, as root and before
# PYTHONDONTWRITEBYTECODE is set, caches exactly what it loads (~3.6 MB), and
# fails the build if the app cannot even be imported.
RUN ["/usr/bin/python3", "-c", "import sambaproxy, ssl, urllib.request"]
ENV HOST=0.0.0.0 \
    PORT=8666 \
    TOKEN_CACHE_FILE=/data/token.json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1001:1001
VOLUME ["/data"]
EXPOSE 8666
# No shell or curl in this image: the interpreter itself asks /info, bypassing
# any HTTP(S)_PROXY meant for upstream, over HTTPS when TLS is configured.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/bin/python3", "-c", "import os,ssl,urllib.request as u; s='https' if os.environ.get('TLS_CERT_FILE') else 'http'; u.build_opener(u.ProxyHandler({}), u.HTTPSHandler(context=ssl._create_unverified_context())).open('%s://127.0.0.1:%s/info' % (s, os.environ.get('PORT', '8666')), timeout=3)"]
# The app handles SIGTERM itself (graceful stop), so it can run as PID 1.
ENTRYPOINT ["/usr/bin/python3", "/app/sambaproxy.py"]
CMD []
