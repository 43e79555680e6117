# The EcoWatt server in a small container (docs/operations.md):
#   docker build -t ecowatt .
#   docker run -d --name ecowatt -p 5001:5001 -v ecowatt-data:/data ecowatt
#   docker cp ecowatt:/data/admin.token . && cat admin.token
# The image holds one static-ish binary on distroless (glibc, no shell): ~30 MB.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ecowatt \
 && strip target/release/ecowatt \
 && mkdir /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/ecowatt /usr/local/bin/ecowatt
# The data directory (SQLite store, admin token) belongs to the image's
# non-root user (65532); mount a volume there.
COPY --from=build --chown=65532:65532 /data /data
ENV ECOWATT_DATA_DIR=/data \
    ECOWATT_BIND=0.0.0.0:5001 \
    ECOWATT_LOG_FORMAT=json
VOLUME /data
EXPOSE 5001
USER 65532:65532
# SIGTERM stops the server gracefully (long polls answered, requests finish).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ecowatt"]
CMD ["server"]
