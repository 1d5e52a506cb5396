//! Typed NFSv3, MOUNT and portmap calls over the pipelined RPC transport.

pub mod client;
pub mod mount;
pub mod session;
pub mod types;

pub use client::{Failure, NfsClient, NfsError, NfsResult};
pub use session::{ConnectConfig, ConnectError, NfsSession};
pub use types::*;
