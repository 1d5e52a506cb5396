//! Transport faults against hostile fake servers on loopback: a server that
//! hangs up, one that claims a 4 GiB opaque, one that never answers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use csi_nfs_fuse::nfs::{Failure, FileHandle, NfsClient};
use csi_nfs_fuse::rpc::{AuthSys, Credential, RpcClient, RpcConfig, RpcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Records the largest single allocation, to prove wire lengths are capped
/// before anything is allocated.
struct PeakAlloc;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarding the caller's layout unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above; the contract is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

fn cred() -> Credential {
    Credential::Sys(AuthSys::new(0, 0, vec![], "t".into()))
}

fn soft(timeo_ms: u64, retrans: u32) -> RpcConfig {
    RpcConfig {
        timeo: Duration::from_millis(timeo_ms),
        retrans,
        hard: false,
        resvport: false,
        ..Default::default()
    }
}

fn cpu_time() -> Duration {
    let r = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(r.user_time()) + tv(r.system_time())
}

/// Reads one call record and returns its XID.
async fn read_call(sock: &mut tokio::net::TcpStream) -> Option<u32> {
    let mut hdr = [0u8; 4];
    sock.read_exact(&mut hdr).await.ok()?;
    let len = (u32::from_be_bytes(hdr) & 0x7FFF_FFFF) as usize;
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).await.ok()?;
    Some(u32::from_be_bytes([body[0], body[1], body[2], body[3]]))
}

async fn serve(handler: fn(u32) -> Option<Vec<u8>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                while let Some(xid) = read_call(&mut sock).await {
                    match handler(xid) {
                        Some(reply) => {
                            if !send_record(&mut sock, &reply).await {
                                return;
                            }
                        }
                        None => return, // hang up
                    }
                }
            });
        }
    });
    addr
}

/// Writes `reply` as one record; false once the client is gone.
async fn send_record(sock: &mut tokio::net::TcpStream, reply: &[u8]) -> bool {
    let mut rec = ((reply.len() as u32) | 0x8000_0000).to_be_bytes().to_vec();
    rec.extend_from_slice(reply);
    sock.write_all(&rec).await.is_ok()
}

fn accepted_success(xid: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [xid, 1, 0, 0, 0, 0] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_hangs_up_gives_an_error_without_spinning() {
    let addr = serve(|_| None).await;
    let nfs = NfsClient::new(RpcClient::new(addr, soft(1000, 2)));
    let cpu0 = cpu_time();
    let start = Instant::now();
    let err = nfs.null(&cred()).await.unwrap_err();
    let wall = start.elapsed();
    let cpu = cpu_time() - cpu0;
    assert!(matches!(err, RpcError::TimedOut { .. }), "{err}");
    assert!(
        wall <= Duration::from_millis(2500),
        "soft call took {wall:?}, beyond timeo x retrans"
    );
    // A busy loop on EOF would burn a whole core for the whole wait.
    assert!(cpu < wall / 4, "used {cpu:?} of CPU in {wall:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_claiming_a_4gib_opaque_is_refused_without_allocating_it() {
    let addr = serve(|xid| {
        let mut v = accepted_success(xid);
        v.extend_from_slice(&0u32.to_be_bytes()); // NFS3_OK
        v.extend_from_slice(&0u32.to_be_bytes()); // no attributes
        v.extend_from_slice(&4096u32.to_be_bytes()); // count
        v.extend_from_slice(&0u32.to_be_bytes()); // eof
        v.extend_from_slice(&0xFFFF_FFFCu32.to_be_bytes()); // data length: ~4 GiB
        v.extend_from_slice(b"only a few bytes follow");
        Some(v)
    })
    .await;
    let nfs = NfsClient::new(RpcClient::new(addr, soft(2000, 1)));
    LARGEST.store(0, Ordering::Relaxed);
    let fh = FileHandle::new(vec![1u8; 8]).unwrap();
    let err = nfs.read(&cred(), &fh, 0, 4096).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Failure::Rpc(RpcError::Xdr(_))), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 8 << 20, "largest allocation was {largest} bytes");
}

/// A reply whose record mark claims 2 GiB: the client drops the connection
/// rather than buffer it, and fails that call with an error naming the
/// problem, even on a hard mount (the same call would get the same reply
/// after every reconnect, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_reply_fails_its_call_and_resets_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                while let Some(xid) = read_call(&mut sock).await {
                    let _ = sock.write_all(&0xFFFF_FFF0u32.to_be_bytes()).await;
                    let _ = sock.write_all(&xid.to_be_bytes()).await;
                    let _ = sock.write_all(&[0u8; 64]).await;
                }
            });
        }
    });
    let rpc = RpcClient::new(
        addr,
        RpcConfig {
            hard: true,
            resvport: false,
            ..Default::default()
        },
    );
    LARGEST.store(0, Ordering::Relaxed);
    let (nfs, who) = (NfsClient::new(rpc.clone()), cred());
    let err = tokio::time::timeout(Duration::from_secs(10), nfs.null(&who))
        .await
        .expect("a hard call kept resending into the same oversized reply")
        .unwrap_err();
    assert!(matches!(err, RpcError::RecordTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    assert!(rpc.stats().connects >= 1);
    assert!(LARGEST.load(Ordering::Relaxed) < 8 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_soft_call_fails_within_timeo_times_retrans() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock); // accept and never answer
        }
    });
    let rpc = RpcClient::new(addr, soft(300, 3));
    let start = Instant::now();
    let err = NfsClient::new(rpc.clone()).null(&cred()).await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, RpcError::TimedOut { .. }), "{err}");
    assert!(
        took >= Duration::from_millis(850) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert!(rpc.stats().retransmits >= 2, "{:?}", rpc.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_call_survives_a_server_that_drops_the_first_connection() {
    use std::sync::atomic::AtomicBool;
    static FIRST: AtomicBool = AtomicBool::new(true);
    let addr = serve(|xid| {
        if FIRST.swap(false, Ordering::SeqCst) {
            None // hang up on the first call
        } else {
            Some(accepted_success(xid))
        }
    })
    .await;
    let rpc = RpcClient::new(
        addr,
        RpcConfig {
            timeo: Duration::from_secs(5),
            resvport: false,
            ..Default::default()
        },
    );
    NfsClient::new(rpc.clone())
        .null(&cred())
        .await
        .expect("resent after reconnect");
    let st = rpc.stats();
    assert_eq!(st.connects, 2, "{st:?}");
    assert_eq!(
        st.calls_sent, 2,
        "the same call was sent once per connection: {st:?}"
    );
}

/// A server whose first connection either hangs up on the first call or
/// never answers it, and whose later connections answer; it records each
/// connection's peer address.
async fn serve_second_connection(
    hang_up: bool,
) -> (SocketAddr, Arc<parking_lot::Mutex<Vec<SocketAddr>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peers = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = peers.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, peer)) = listener.accept().await {
            let first = {
                let mut seen = seen.lock();
                seen.push(peer);
                seen.len() == 1
            };
            tokio::spawn(async move {
                while let Some(xid) = read_call(&mut sock).await {
                    if first && hang_up {
                        return;
                    }
                    if first {
                        continue; // silent: the client must give up on us
                    }
                    if !send_record(&mut sock, &accepted_success(xid)).await {
                        return;
                    }
                }
            });
        }
    });
    (addr, peers)
}

/// A call resent after a reconnect comes from the old connection's source
/// port, so the server's duplicate request cache (which keys on address
/// and port) can recognise it: both when the server hangs up and when the
/// client gives up on a connection that stopped answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_keeps_the_source_port() {
    for hang_up in [true, false] {
        let (addr, peers) = serve_second_connection(hang_up).await;
        let rpc = RpcClient::new(
            addr,
            RpcConfig {
                timeo: Duration::from_millis(300),
                retrans: 0,
                resvport: false,
                ..Default::default()
            },
        );
        NfsClient::new(rpc.clone())
            .null(&cred())
            .await
            .expect("resent after reconnect");
        let peers = peers.lock().clone();
        assert_eq!(peers.len(), 2, "hang_up {hang_up}: {peers:?}");
        assert_eq!(
            peers[0].port(),
            peers[1].port(),
            "hang_up {hang_up}: the resend came from a new port"
        );
    }
}
