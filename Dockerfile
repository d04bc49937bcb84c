# OllamaFlow: state (settings and database) lives in the /data volume.
FROM python:3.11-slim

RUN useradd --system --create-home --home-dir /home/ollamaflow --uid 10001 ollamaflow \
    && mkdir /data && chown ollamaflow /data

WORKDIR /src
COPY . /src
# Install, then let twistd rebuild its plugin cache while the image is still writable.
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; list(getPlugins(IPlugin, twisted.plugins))" \
    && rm -rf /src

USER ollamaflow
WORKDIR /data
VOLUME ["/data"]
EXPOSE 43411
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:43411/', timeout=2).status == 200 else 1)"
CMD ["twistd", "-n", "--pidfile=", "ollamaflow", "--config", "/data/ollamaflow.json"]
