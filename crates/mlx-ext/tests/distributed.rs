//! MLX's ring backend between real processes on 127.0.0.1: this test binary starts copies of
//! itself as the ranks (marked by a `--skip` filter that matches no test, so the harness accepts
//! it and no environment switch is needed), with the environment `mlx.launch` would give them,
//! and checks what each rank computed. Bounded: every child is killed after 60 s.

use mlx_ext::distributed::{DistBackend, Group};
use mlx_rs::Array;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD: &str = "kvsplit-dist-child";

/// Whether this process is a rank started by [`ring`] or [`strict_ring_without_a_launcher_names_the_backend`].
fn is_child() -> bool {
    std::env::args().any(|a| a == CHILD)
}

/// The harness arguments that run only `test`, in a child.
fn child_args(test: &str) -> [&str; 7] {
    [test, "--exact", "--nocapture", "--test-threads", "1", "--skip", CHILD]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `test` in `n` processes as ranks of one ring; returns each rank's stdout.
fn ring(n: usize, test: &str) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("kvsplit-dist-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts: Vec<Vec<String>> = (0..n).map(|_| vec![format!("127.0.0.1:{}", free_port())]).collect();
    let hostfile = dir.join("hosts.json");
    std::fs::write(&hostfile, serde_json::to_string(&hosts).unwrap()).unwrap();
    let mut children: Vec<_> = (0..n)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args(child_args(test))
                .env("MLX_RANK", rank.to_string())
                .env("MLX_HOSTFILE", &hostfile)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    let t0 = Instant::now();
    let mut outs = Vec::new();
    for c in &mut children {
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                let mut s = String::new();
                c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
                assert!(status.success(), "a rank failed: {s}");
                outs.push(s);
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                for k in &mut children {
                    let _ = k.kill();
                }
                panic!("ranks did not finish in 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    outs
}

fn values(a: &Array) -> Vec<f32> {
    a.as_slice::<f32>().to_vec()
}

/// Each rank's `RESULT <name> <values...>` (the harness may print its test name before it).
fn result(out: &str, name: &str) -> Vec<f32> {
    let tag = format!("RESULT {name} ");
    let line = out.lines().find_map(|l| l.split_once(&tag).map(|(_, rest)| rest)).unwrap_or_else(|| panic!("no {name} in {out}"));
    line.split_whitespace().map(|v| v.parse().unwrap()).collect()
}

#[test]
fn collectives_over_a_ring_of_two() {
    if is_child() {
        let g = Group::init(DistBackend::Ring, true).unwrap();
        let r = g.rank() as f32;
        // Rank r holds [r+1, 10(r+1), -r]: sums and gathers are exact in f32.
        let x = Array::from_slice(&[r + 1.0, 10.0 * (r + 1.0), -r], &[3]);
        let sum = g.all_sum(&x).unwrap();
        let gathered = g.all_gather(&x.reshape(&[1, 3]).unwrap()).unwrap();
        sum.eval().unwrap();
        gathered.eval().unwrap();
        // A ring of two: each sends its values to the other and receives the other's.
        let other = 1 - g.rank();
        let (sent, got) = if g.rank() == 0 {
            let s = g.send(&x, other).unwrap();
            s.eval().unwrap();
            let got = g.recv_like(&x, other).unwrap();
            got.eval().unwrap();
            (s, got)
        } else {
            let got = g.recv_like(&x, other).unwrap();
            got.eval().unwrap();
            let s = g.send(&x, other).unwrap();
            s.eval().unwrap();
            (s, got)
        };
        drop(sent);
        println!("RESULT size {}", g.size());
        println!("RESULT rank {}", g.rank());
        for (name, a) in [("sum", &sum), ("gather", &gathered), ("recv", &got)] {
            println!("RESULT {name} {}", values(a).iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" "));
        }
        return;
    }
    let outs = ring(2, "collectives_over_a_ring_of_two");
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(result(out, "size"), vec![2.0]);
        assert_eq!(result(out, "rank"), vec![rank as f32]);
        assert_eq!(result(out, "sum"), vec![3.0, 30.0, -1.0]);
        assert_eq!(result(out, "gather"), vec![1.0, 10.0, 0.0, 2.0, 20.0, -1.0]);
        let other = (1 - rank) as f32;
        assert_eq!(result(out, "recv"), vec![other + 1.0, 10.0 * (other + 1.0), -other]);
    }
}

#[test]
fn strict_ring_without_a_launcher_names_the_backend() {
    if is_child() {
        return;
    }
    // A child without MLX_RANK/MLX_HOSTFILE: strict init fails with a message, loose init gives
    // a group of one.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(child_args("alone"))
        .env_remove("MLX_RANK")
        .env_remove("MLX_HOSTFILE")
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("RESULT loose-size 1"), "{s}");
    let line = s.lines().find(|l| l.contains("STRICT ")).unwrap_or_else(|| panic!("no STRICT line in {s}"));
    assert!(line.contains("distributed backend 'ring'"), "{line}");
}

#[test]
fn alone() {
    if !is_child() {
        return;
    }
    match Group::init(DistBackend::Ring, true) {
        Ok(g) => println!("STRICT unexpectedly joined a group of {}", g.size()),
        Err(e) => println!("STRICT {e}"),
    }
    println!("RESULT loose-size {}", Group::init(DistBackend::Ring, false).unwrap().size());
}
