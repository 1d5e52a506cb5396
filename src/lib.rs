//! csi-nfs-fuse: NFSv3 volumes for Docker Swarm through a userspace FUSE client.

pub mod cp;
pub mod csi;
pub mod fs;
pub mod fuse;
pub mod mount;
pub mod nfs;
pub mod options;
pub mod rpc;
