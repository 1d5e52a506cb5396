use std::path::PathBuf;

use clap::{Parser, Subcommand};

use csi_nfs_fuse::mount::{self, MountRequest};

#[derive(Parser)]
#[command(
    name = "csi-nfs-fuse",
    version,
    about = "NFSv3 volumes through a userspace FUSE client, and a Docker Swarm CSI plugin"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount an NFSv3 export: nfs://SERVER[:PORT]/EXPORT[/SUBDIR] or SERVER:/EXPORT.
    Mount {
        source: String,
        mountpoint: PathBuf,
        /// Mount options, comma separated (nfs(5) names plus uid=, gid=, allow_other, cache_size=, fuse_threads=, fsname=, debug).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Stay in the foreground (the default for this subcommand).
        #[arg(short = 'f', long, conflicts_with = "daemon")]
        foreground: bool,
        /// Detach once the mount is live, as a mount helper does.
        #[arg(long)]
        daemon: bool,
        /// Write "OK" (or "ERR reason") to this descriptor when the mount is live.
        #[arg(long, value_name = "FD")]
        ready_fd: Option<i32>,
    },
    /// Run the CSI plugin (Identity, Controller and Node services) for Docker Swarm.
    Plugin {
        /// CSI endpoint: unix:///path/to/csi.sock or a bare socket path.
        #[arg(long, env = "CSI_ENDPOINT", value_name = "ENDPOINT")]
        endpoint: String,
        /// Node id for NodeGetInfo [default: /node_hostname, else the hostname].
        #[arg(long, env = "CSI_NODE_ID", value_name = "ID")]
        node_id: Option<String>,
        /// Socket file mode, octal: 600 or 660.
        #[arg(long, default_value = "660", value_parser = parse_socket_mode, value_name = "MODE")]
        socket_mode: u32,
        /// FUSE device that Probe checks (for tests).
        #[arg(long, default_value = "/dev/fuse", hide = true)]
        fuse_device: PathBuf,
    },
    /// Copy one file to or from an NFS server without FUSE (like nfs-cp).
    Cp {
        source: String,
        dest: String,
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
}

fn parse_socket_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m @ (0o600 | 0o660)) => Ok(m),
        _ => Err(format!("'{s}': expected 600 or 660")),
    }
}

fn init_logging(debug: bool) {
    // fuser warns when it finds the mount already gone at exit; that is our
    // own lazy unmount (or the user's umount), not a problem.
    let default = if debug {
        "debug"
    } else {
        "info,fuser::mnt=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CSI_NFS_FUSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a terminal: dockerd and journald keep the escapes verbatim.
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Mount-helper entry points, both treated as `mount --daemon`:
/// - `/sbin/mount.fuse.csi-nfs-fuse SRC DIR -o OPTS` (a symlink to us), which
///   mount(8) runs for `mount -t fuse.csi-nfs-fuse` and fstab entries;
/// - `csi-nfs-fuse SRC DIR -o OPTS`, which is how fuse3's mount.fuse3 runs
///   the program named after `fuse.` when no such symlink exists.
fn helper_args() -> Vec<String> {
    let mut args: Vec<String> = std::env::args().collect();
    let argv0 = std::path::Path::new(&args[0])
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let source_first = args.len() >= 3
        && !args[1].starts_with('-')
        && (args[1].contains(":/") || args[1].starts_with("nfs://"));
    if argv0.starts_with("mount.") || source_first {
        args[0] = "csi-nfs-fuse".into();
        args.insert(1, "mount".into());
        args.push("--daemon".into());
    }
    args
}

/// One malloc arena for the whole process. Page-cache blocks are allocated
/// on whichever thread reads the reply and freed on whichever evicts them;
/// with glibc's per-thread arenas the memory freed in one arena does not
/// serve the next allocation in another, and RSS drifted 40-140 MiB past
/// `cache_size` under 4 parallel readers (one arena: within 50 MiB).
fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only adjusts allocator tuning; it is called before any
    // thread exists, and a refusal (returns 0) just keeps the default.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() {
    single_malloc_arena();
    let cli = Cli::parse_from(helper_args());
    let result = match cli.cmd {
        Cmd::Mount {
            source,
            mountpoint,
            options,
            foreground: _,
            daemon,
            ready_fd,
        } => (|| {
            let (source, mountpoint, options) = mount::prepare(&source, &mountpoint, &options)?;
            init_logging(options.debug);
            let req = MountRequest {
                source,
                mountpoint,
                options,
                ready_fd,
            };
            if daemon {
                mount::daemonize_and_run(req)
            } else {
                mount::run(req)
            }
        })(),
        Cmd::Plugin {
            endpoint,
            node_id,
            socket_mode,
            fuse_device,
        } => {
            init_logging(false);
            csi_nfs_fuse::csi::run(csi_nfs_fuse::csi::PluginConfig {
                endpoint,
                node_id,
                fuse_device,
                socket_mode,
            })
        }
        Cmd::Cp {
            source,
            dest,
            options,
        } => {
            init_logging(false);
            csi_nfs_fuse::cp::run(&source, &dest, &options)
        }
    };
    if let Err(e) = result {
        eprintln!("csi-nfs-fuse: {}", csi_nfs_fuse::mount::describe(&e));
        std::process::exit(1);
    }
}
