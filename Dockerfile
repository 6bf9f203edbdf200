# sambaproxy: an OpenAI-compatible gateway to SambaNova Cloud.
#   docker build -t sambaproxy .
#   docker run -p 8666:8666 --env-file .env -v sambaproxy-token:/data sambaproxy
#
# The image is the archive: distroless Python (no shell, no package manager) plus
# sambaproxy.pyz, the one file `make pyz` builds, here from the pinned requirements installed
# into a plain directory. Two choices keep it under 55 MB and its start near 0.3 s of CPU:
# - the archive holds bytecode only (--bytecode-only, 1.0 MB instead of 1.6): the builder's
#   Python and distroless's are both 3.13; tracebacks name file and line, without the text;
# - distroless ships the standard library without bytecode, and the runtime user cannot write
#   any, so each start would compile ~150 modules (~0.2 s of CPU). deploy/stdlib_zip.py, run
#   by distroless's own interpreter, starts the archive once and puts the bytecode of what it
#   loaded (plain modules, whole packages) into /usr/lib/python313.zip, which CPython searches
#   before /usr/lib/python3.13 (0.8 MB; the __pycache__ folders would take ~4 MB).

FROM python:3.13-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements.txt /src/requirements.txt
RUN python3 -m pip install --no-cache-dir --no-compile --target /deps -r /src/requirements.txt
# The project as `make pyz` sees it (tests, .env and the rest are kept out by .dockerignore):
# the build script takes every top-level module and static file itself.
COPY . /src/
RUN python3 /src/deploy/build_pyz.py --bytecode-only --site-packages /deps --output /out/app/sambaproxy.pyz \
 && mkdir -p /out/data && chown 1001:1001 /out/data && chmod 0700 /out/data

FROM gcr.io/distroless/python3-debian13 AS stdlib
COPY --from=builder /out/app/sambaproxy.pyz /app/sambaproxy.pyz
COPY deploy/stdlib_zip.py /tools/stdlib_zip.py
# Without the column tables of PEP 657, as the archive's own bytecode (see build_pyz.py).
RUN ["/usr/bin/python3", "-X", "no_debug_ranges", "/tools/stdlib_zip.py", "/app/sambaproxy.pyz", "/out"]

FROM gcr.io/distroless/python3-debian13
ARG VERSION=dev
LABEL org.opencontainers.image.title="sambaproxy" \
      org.opencontainers.image.description="OpenAI-compatible gateway to SambaNova Cloud (HTTP/1.1 and HTTP/2, streaming)" \
      org.opencontainers.image.version="${VERSION}"
# The archive (/app/sambaproxy.pyz), and the token cache's directory (/data) owned by the
# runtime user, which writes the cache with mode 0600; then the standard library's bytecode.
COPY --from=builder /out/ /
COPY --from=stdlib /out/ /
# What is still compiled (the rest of the standard library) is cached in /tmp for the next
# process of the same container: healthchecks, restarts. A read-only root just skips that.
ENV HOST=0.0.0.0 \
    PORT=8666 \
    TOKEN_CACHE_FILE=/data/token.json \
    PYTHONUNBUFFERED=1 \
    PYTHONPYCACHEPREFIX=/tmp/pycache
USER 1001:1001
VOLUME ["/data"]
EXPOSE 8666
# No shell or curl in this image: the interpreter itself asks /healthz, bypassing
# any HTTP(S)_PROXY meant for upstream, over HTTPS when TLS is configured.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/bin/python3", "-c", "import os,ssl,urllib.request as u; s='https' if os.environ.get('TLS_CERT_FILE') else 'http'; u.build_opener(u.ProxyHandler({}), u.HTTPSHandler(context=ssl._create_unverified_context())).open('%s://127.0.0.1:%s/healthz' % (s, os.environ.get('PORT', '8666')), timeout=3)"]
# The app handles SIGTERM itself (graceful stop), so it can run as PID 1.
ENTRYPOINT ["/usr/bin/python3", "/app/sambaproxy.pyz"]
CMD []
