# csi-nfs-fuse as a Docker managed plugin, for users with a registry.
#
# Stage "build" compiles the release binary; the runtime stage is the plugin's
# rootfs: Debian bookworm-slim (glibc, matching the builder) plus
# /csi-nfs-fuse. A managed plugin is not an image, so turn the image into
# plugin/build/{rootfs,config.json} and create the plugin from that:
#
#   docker build -t csi-nfs-fuse-rootfs .
#   plugin/build.sh --image csi-nfs-fuse-rootfs --name csi-nfs-fuse
#
# which runs, in effect:
#
#   rm -rf plugin/build && mkdir -p plugin/build/rootfs
#   id=$(docker create csi-nfs-fuse-rootfs)
#   docker export "$id" | tar -x -C plugin/build/rootfs
#   docker rm "$id"
#   cp plugin/config.json plugin/build/config.json
#   docker plugin create csi-nfs-fuse plugin/build
#   docker plugin enable csi-nfs-fuse
#
# To distribute it, create it under a registry name and push it, then install
# it on every node (the alias must be the same everywhere):
#
#   docker plugin create registry.example.com/csi-nfs-fuse:0.1.0 plugin/build
#   docker plugin push registry.example.com/csi-nfs-fuse:0.1.0
#   docker plugin install --alias csi-nfs-fuse --grant-all-permissions registry.example.com/csi-nfs-fuse:0.1.0
#
# Without a registry or base images, plugin/build.sh (no --image) builds the
# same rootfs from the local release binary and the libraries ldd lists.
# The entrypoint and everything else the plugin needs come from
# plugin/config.json, not from this image's ENTRYPOINT.

FROM rust:bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin csi-nfs-fuse \
    && strip --strip-debug target/release/csi-nfs-fuse

FROM debian:bookworm-slim
COPY --from=build /src/target/release/csi-nfs-fuse /csi-nfs-fuse
RUN mkdir -p /run/docker/plugins /data/published /data/staged \
    && ln -s /csi-nfs-fuse /sbin/mount.fuse.csi-nfs-fuse
ENTRYPOINT ["/csi-nfs-fuse", "plugin"]
