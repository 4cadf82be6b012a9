//! The proxies carry multifd migrations, in process: a fake source QEMU opens the main
//! channel and multifd channels to the source proxy, a fake destination QEMU takes
//! what the destination proxy delivers; each connection must arrive byte for byte, on
//! its own connection, the main channel first, whatever the interleaving of the
//! channels' bytes. And a migration's connections fail together, and never mix with
//! another migration's.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use migstream::ErrorKind;
use migstream::relay::net::{Conn, Endpoint};
use migstream::relay::tls::{TlsClient, TlsServer};
use migstream::relay::{
    DestinationConfig, DestinationProxy, Progress, ProxyLimits, Served, SourceConfig, SourceProxy,
    Timeouts,
};
use support::pki::{PKI, identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A migration as the source QEMU sends it: the main channel, then channels 0..n
/// (bundled channel files, each given its channel id in its greeting).
fn migration(channels: usize) -> Vec<Vec<u8>> {
    let files = [
        "multifd/real-qemu-10.0-q35.mfd",
        "multifd/qemu-7.2-nocomp.mfd",
        "multifd/real-qemu-7.2-fill.mfd",
        "multifd/qemu-10.0-zstd.mfd",
        "multifd/qemu-10.0-nocomp.mfd",
    ];
    let mut connections = vec![testdata("qemu-7.2-pc-paused.mig")];
    for id in 0..channels {
        let mut channel = testdata(files[id % files.len()]);
        channel[24] = id as u8;
        connections.push(channel);
    }
    connections
}

/// Short timeouts: a test that goes wrong fails in seconds.
fn timeouts() -> Timeouts {
    Timeouts::default()
        .with_handshake(Duration::from_secs(5))
        .with_idle(Duration::from_secs(10))
        .with_connect(Duration::from_secs(5))
}

/// The two proxies on loopback over mutual TLS, serving every connection, and a fake
/// destination QEMU that keeps each connection's bytes in accept order.
struct Lab {
    source_addr: String,
    source_served: mpsc::UnboundedReceiver<migstream::Result<Served>>,
    destination_served: mpsc::UnboundedReceiver<migstream::Result<Served>>,
    delivered: mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
    /// Connections the destination QEMU accepted so far.
    accepted: Arc<tokio::sync::watch::Sender<usize>>,
    _tasks: JoinSet<()>,
}

impl Lab {
    async fn start(limits: ProxyLimits) -> Lab {
        let mut tasks = JoinSet::new();
        let qemu = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let qemu_addr = qemu.local_addr().unwrap().to_string();
        let (delivered_tx, delivered) = mpsc::unbounded_channel();
        let accepted = Arc::new(tokio::sync::watch::Sender::new(0));
        let accepting = accepted.clone();
        tasks.spawn(async move {
            // numbered in accept order, read concurrently (as QEMU's threads do)
            for index in 0.. {
                let (mut conn, _) = qemu.accept().await.unwrap();
                accepting.send_modify(|n| *n += 1);
                let tx = delivered_tx.clone();
                tokio::spawn(async move {
                    let mut bytes = Vec::new();
                    let _ = conn.read_to_end(&mut bytes).await;
                    let _ = tx.send((index, bytes));
                });
            }
        });

        let link = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let link_addr = link.local_addr().unwrap().to_string();
        let tls = TlsServer::new(&identity(&PKI.server, &PKI.ca), &[]).unwrap();
        let config = DestinationConfig::default().with_timeouts(timeouts());
        let destination = Arc::new(
            DestinationProxy::new(config, Endpoint::Tcp(qemu_addr), Some(tls))
                .with_limits(limits.clone()),
        );
        let (destination_tx, destination_served) = mpsc::unbounded_channel();
        tasks.spawn(async move {
            loop {
                let (conn, _) = link.accept().await.unwrap();
                let (proxy, tx) = (destination.clone(), destination_tx.clone());
                tokio::spawn(async move {
                    let served = match proxy.handshake(Conn::Tcp(conn)).await {
                        Ok(incoming) => incoming.restore(&Progress::default()).await,
                        Err(e) => Err(e),
                    };
                    let _ = tx.send(served);
                });
            }
        });

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let source_addr = listener.local_addr().unwrap().to_string();
        let tls = TlsClient::new(&identity(&PKI.source_a, &PKI.ca), "dest.example").unwrap();
        let config = SourceConfig::default().with_timeouts(timeouts());
        let source = Arc::new(SourceProxy::new(config, link_addr, Some(tls)).with_limits(limits));
        let (source_tx, source_served) = mpsc::unbounded_channel();
        tasks.spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let (proxy, tx) = (source.clone(), source_tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(proxy.serve(Conn::Tcp(conn), &Progress::default()).await);
                });
            }
        });
        Lab {
            source_addr,
            source_served,
            destination_served,
            delivered,
            accepted,
            _tasks: tasks,
        }
    }

    /// `n` outcomes of `served`, within 30 s.
    async fn outcomes(
        served: &mut mpsc::UnboundedReceiver<migstream::Result<Served>>,
        n: usize,
    ) -> Vec<migstream::Result<Served>> {
        let mut all = Vec::new();
        for _ in 0..n {
            let next = tokio::time::timeout(Duration::from_secs(30), served.recv());
            all.push(next.await.expect("an outcome within 30 s").unwrap());
        }
        all
    }
}

/// How the fake source QEMU interleaves its connections' bytes. The main channel's
/// first bytes always come first, as QEMU's do (its header and configuration go out
/// before any RAM); after that, anything.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// Main channel whole, then each channel whole, in order.
    Sequential,
    /// Channels whole, last first, then the rest of the main channel.
    ChannelsReversedBeforeMain,
    /// Chunks of 1-5000 bytes from connections picked at random, each connection
    /// written in its own order.
    Shuffled(u64),
}

/// Connects every connection of `migration` to the lab's source proxy (main first),
/// then writes their bytes in `order`, and closes them. The main channel's last bytes
/// go last, once the destination QEMU has every connection: QEMU sends the end of its
/// main channel after the channels' last packets, and gigabytes of pages come before
/// those, where these channel files are a few kilobytes.
async fn send(lab: &Lab, migration: &[Vec<u8>], order: Order) {
    let addr = &lab.source_addr;
    let all = migration.len() + *lab.accepted.borrow();
    let mut conns = Vec::new();
    for _ in migration {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    let head = 4096.min(migration[0].len());
    conns[0].write_all(&migration[0][..head]).await.unwrap();
    let mut cursor = vec![0; migration.len()];
    cursor[0] = head;
    let tail = migration[0].len() - 64;
    let mut plan: Vec<(usize, usize)> = Vec::new();
    match order {
        Order::Sequential => {
            for (i, bytes) in migration.iter().enumerate() {
                plan.push((i, bytes.len() - cursor[i]));
            }
            plan[0].1 -= 64;
        }
        Order::ChannelsReversedBeforeMain => {
            for i in (1..migration.len()).rev() {
                plan.push((i, migration[i].len()));
            }
            plan.push((0, tail - head));
        }
        Order::Shuffled(seed) => {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut left: Vec<usize> = migration
                .iter()
                .zip(&cursor)
                .map(|(m, c)| m.len() - c)
                .collect();
            left[0] -= 64;
            while left.iter().any(|&n| n > 0) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let open: Vec<usize> = (0..left.len()).filter(|&i| left[i] > 0).collect();
                let i = open[(rng % open.len() as u64) as usize];
                let n = (1 + (rng >> 32) % 5000) as usize;
                let n = n.min(left[i]);
                plan.push((i, n));
                left[i] -= n;
            }
        }
    }
    // each connection writes on its own task, in plan order: a connection the proxy
    // does not read yet (a channel waiting for the main channel's page size) must not
    // hold up the others, as QEMU's threads do not
    let turns: Vec<Arc<Semaphore>> = plan.iter().map(|_| Arc::new(Semaphore::new(0))).collect();
    if let Some(first) = turns.first() {
        first.add_permits(1);
    }
    let mut writers = JoinSet::new();
    let main_tail = Arc::new(Semaphore::new(0));
    for (i, mut conn) in conns.into_iter().enumerate() {
        let bytes = migration[i].clone();
        let mut at = cursor[i];
        let mine: Vec<(usize, usize)> = plan
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| *c == i)
            .map(|(step, (_, n))| (step, *n))
            .collect();
        let (turns, main_tail) = (turns.clone(), main_tail.clone());
        writers.spawn(async move {
            for (step, n) in mine {
                let _turn = turns[step].acquire().await.unwrap();
                // the next step may start once these bytes are in the socket's hands
                let written = conn.write_all(&bytes[at..at + n]);
                if let Some(next) = turns.get(step + 1) {
                    next.add_permits(1);
                }
                written.await.unwrap();
                at += n;
            }
            if i == 0 {
                let _last = main_tail.acquire().await.unwrap();
                conn.write_all(&bytes[at..]).await.unwrap();
            }
            conn.shutdown().await.unwrap();
            // QEMU keeps its side open until the migration ends: read to the end
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest).await;
        });
    }
    let mut connected = lab.accepted.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|&n| n >= all)).await;
    main_tail.add_permits(1);
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
}

/// Splits `outcomes` into the one migration report and the channel ids, in order.
fn one_migration(outcomes: Vec<migstream::Result<Served>>) -> (migstream::relay::Report, Vec<u8>) {
    let (mut report, mut channels) = (None, Vec::new());
    for outcome in outcomes {
        match outcome.unwrap() {
            Served::Migration(r) => assert!(report.replace(r).is_none(), "two migrations"),
            Served::Channel(id) => channels.push(id),
            other => panic!("{other:?}"),
        }
    }
    channels.sort_unstable();
    (*report.expect("the migration's report"), channels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_channel_arrives_whole_whatever_the_interleaving() {
    let migration = migration(4);
    let total: u64 = migration.iter().map(|c| c.len() as u64).sum();
    let orders = [
        Order::Sequential,
        Order::ChannelsReversedBeforeMain,
        Order::Shuffled(1),
        Order::Shuffled(2),
        Order::Shuffled(3),
    ];
    let mut lab = Lab::start(ProxyLimits::default()).await;
    for order in orders {
        send(&lab, &migration, order).await;
        for served in [&mut lab.source_served, &mut lab.destination_served] {
            let (report, channels) = one_migration(Lab::outcomes(served, 5).await);
            assert_eq!(channels, [0, 1, 2, 3], "{order:?}");
            assert_eq!(report.stats.qemu_bytes, total, "{order:?}");
            let ids: Vec<u8> = report.channels.iter().map(|(id, _)| *id).collect();
            assert_eq!(ids, [0, 1, 2, 3], "{order:?}");
        }
        let mut delivered = BTreeMap::new();
        for _ in 0..5 {
            let (index, bytes) = lab.delivered.recv().await.unwrap();
            delivered.insert(index, bytes);
        }
        // the main channel is connected first; each channel on its own connection
        let (&first, main) = delivered.first_key_value().unwrap();
        assert!(
            main == &migration[0],
            "{order:?}: the main channel, first (#{first})"
        );
        let mut channels: Vec<&Vec<u8>> = delivered.values().skip(1).collect();
        channels.sort_by_key(|c| c[24]);
        for (id, channel) in channels.into_iter().enumerate() {
            assert!(
                channel == &migration[id + 1],
                "{order:?}: channel {id} differs"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn channels_are_refused_unless_they_join_one_migration() {
    let mut lab = Lab::start(ProxyLimits::default()).await;
    let migration = migration(2);

    // a channel with no migration in progress, for the handshake timeout
    let mut lone = TcpStream::connect(&lab.source_addr).await.unwrap();
    lone.write_all(&migration[1]).await.unwrap();
    let refused = Lab::outcomes(&mut lab.source_served, 1).await;
    let e = refused.into_iter().next().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("main channel"), "{e}");
    drop(lone);

    // a second main channel while a migration is in progress
    let mut first = TcpStream::connect(&lab.source_addr).await.unwrap();
    first.write_all(&migration[0][..4096]).await.unwrap();
    let mut second = TcpStream::connect(&lab.source_addr).await.unwrap();
    second.write_all(&migration[0][..4096]).await.unwrap();
    let busy = Lab::outcomes(&mut lab.source_served, 1).await;
    let e = busy.into_iter().next().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");

    // another VM's channel 0 after this one's: the migration fails, cleanly
    let mut channels = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(&lab.source_addr).await.unwrap();
        c.write_all(&migration[1][..64]).await.unwrap();
        channels.push(c);
    }
    let outcomes = Lab::outcomes(&mut lab.source_served, 3).await;
    assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
    assert!(
        outcomes.iter().any(|o| o
            .as_ref()
            .is_err_and(|e| e.to_string().contains("joined this migration already"))),
        "{outcomes:?}"
    );
    drop((first, second, channels));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_channel_fails_the_whole_migration() {
    let mut lab = Lab::start(ProxyLimits::default()).await;
    let mut migration = migration(3);
    // a packet header of channel 1 loses its magic: the source's channel decoder stops
    let at = migration[2].len() / 2;
    let packet = (64..at)
        .rev()
        .find(|&i| migration[2][i..i + 4] == [0x11, 0x22, 0x33, 0x44]);
    migration[2][packet.unwrap()] = 0;
    send(&lab, &migration, Order::Sequential).await;
    // the broken channel fails, and with it the migration (channels that ended before
    // may have ended well: they did their part)
    let source = Lab::outcomes(&mut lab.source_served, 4).await;
    let failed = source.iter().filter(|o| o.is_err()).count();
    assert!(failed >= 2, "{source:?}");
    assert!(
        !source.iter().any(|o| matches!(o, Ok(Served::Migration(_)))),
        "{source:?}"
    );
    // the destination proxy saw the links end short: channels that ended before
    // may have ended well, the migration did not
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), lab.destination_served.recv());
        match next.await.expect("the destination's outcomes").unwrap() {
            Ok(Served::Channel(_)) => continue,
            Ok(served) => panic!("the destination completed: {served:?}"),
            Err(_) => break,
        }
    }
}
