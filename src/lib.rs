//! csi-nfs-fuse: NFSv3 volumes for Docker Swarm through a userspace FUSE client.

pub mod nfs;
pub mod options;
pub mod rpc;
