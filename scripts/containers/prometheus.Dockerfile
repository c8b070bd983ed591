# A stand-in for prom/prometheus where no registry can be reached: Debian's Prometheus package, run as the
# official image runs it (config at /etc/prometheus/prometheus.yml, data in /prometheus, user nobody).
ARG BASE=python:3.11-slim
FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus=2.42.* \
    && rm -rf /var/lib/apt/lists/* /usr/share/prometheus/* \
    && mkdir /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
