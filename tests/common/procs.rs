//! Child processes of a test (`livemig send`, `livemig recv`): output collected as
//! it comes, waits with a deadline, and on every exit path (a failed assertion
//! included) continued if stopped, killed and reaped.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a child ended.
#[derive(Debug)]
pub struct Exit {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// From `wait_exit`'s call to the exit.
    pub waited: Duration,
}

impl Exit {
    /// Whether it exited with status 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// A running child; dropping it continues (if stopped), kills and reaps it.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    reaped: bool,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .expect("output lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

impl Proc {
    /// Start `cmd` with stdout and stderr captured; `name` appears in failures.
    pub fn spawn(mut cmd: Command, name: &str) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout"), stdout.clone()),
            collect(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            readers,
            reaped: false,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.lock().expect("output lock").clone()
    }

    /// Send `signal` ("STOP", "CONT", "KILL", ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let st = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill -s {signal} {}: {e}", self.name));
        assert!(st.success(), "kill -s {signal} {} failed", self.name);
    }

    /// Whether it has exited (without reaping it).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Wait up to `limit` for it to exit; on expiry kill it and fail the test.
    pub fn wait_exit(mut self, limit: Duration) -> Exit {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let waited = t0.elapsed();
                self.reaped = true;
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Exit {
                    code: status.code(),
                    stdout: self.stdout.lock().expect("output lock").clone(),
                    stderr: self.stderr.lock().expect("output lock").clone(),
                    waited,
                };
            }
            if t0.elapsed() > limit {
                let err = self.stderr_so_far();
                drop(self);
                panic!("did not exit within {limit:?}; stderr so far: {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if !self.exited() {
            // A test may have stopped it: continue it, then kill it.
            let _ = Command::new("kill")
                .args(["-s", "CONT", &self.pid().to_string()])
                .status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
