//! The destination VMM: a VM and its memory set up before any page arrives, the
//! receive, and the checks that the guest goes on exactly where it stopped.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig::device::{ParticipantError, RestoreState, Veto};
use livemig::kvm::{StateTimings, VcpuRestorer, VmRestorer};
use livemig::receiver::Receiver;
use livemig::transport::tcp::TcpAcceptor;
use serde_json::{json, Value};

use crate::machine::{create_machine, xmm7_ok};
use crate::source::PROGRESS_ID;
use crate::vcpu::{GuestEvent, Runner};
use crate::{err, mono_ns, ms, Opts, Res};

/// Destination side of the guest-progress participant: the last pass the source's
/// guest completed, with bit 63 set once restored.
struct ProgressRestorer {
    last_pass: Arc<AtomicU64>,
}

impl RestoreState for ProgressRestorer {
    fn id(&self) -> &str {
        PROGRESS_ID
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, version: u32, blob: &[u8]) -> Result<(), Veto> {
        if version != 1 || blob.len() != 4 {
            return Err(Veto {
                participant: PROGRESS_ID.into(),
                reason: format!("bad blob v{version}, {} bytes", blob.len()),
            });
        }
        Ok(())
    }
    fn restore(&mut self, _version: u32, blob: &[u8]) -> Result<(), ParticipantError> {
        let v = u32::from_le_bytes(blob.try_into().map_err(|_| ParticipantError::Failed {
            participant: PROGRESS_ID.into(),
            message: "blob is not 4 bytes".into(),
        })?);
        self.last_pass
            .store(u64::from(v) | 1 << 63, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&mut self) {}
}

pub fn destination(listen: &str, opts: &Opts) -> Res<Value> {
    // The VM, its memory and vCPU exist before any page arrives: not downtime.
    let t = Instant::now();
    let m = create_machine(opts)?;
    m.mem.regions()[0]
        .prefault(0, m.mem.total_pages())
        .map_err(err("prefault"))?;
    let setup = t.elapsed();
    let listener = TcpListener::bind(listen).map_err(err("bind"))?;
    println!(
        "LISTENING {}",
        listener.local_addr().map_err(err("local_addr"))?
    );
    std::io::stdout().flush().map_err(err("stdout"))?;
    let timings = Arc::new(StateTimings::default());
    let last_pass = Arc::new(AtomicU64::new(0));
    let received = Receiver::new()
        .memory(m.mem.clone())
        .participant(Box::new(ProgressRestorer {
            last_pass: last_pass.clone(),
        }))
        .participant(Box::new(VmRestorer::new(m.vm.clone(), timings.clone())))
        .participant(Box::new(VcpuRestorer::new(
            "vcpu0",
            m.vcpu.clone(),
            timings.clone(),
        )))
        .run(&TcpAcceptor::from_listener(listener))
        .map_err(err("receive"))?;
    let committed = Instant::now();
    // The pages were applied into this VMM's own vm-memory mapping: the receiver hands
    // back the very `GuestMemoryMmap` the vCPU runs on.
    let in_vmm_ram = received
        .memory
        .vm_memory::<()>()
        .is_some_and(|ram| Arc::ptr_eq(&ram, &m.ram));
    let xmm7 = xmm7_ok(&m)?;
    let last_pass = last_pass.load(Ordering::SeqCst);
    if last_pass & (1 << 63) == 0 {
        return Err("guest-progress state never arrived".into());
    }
    let last_pass_src = last_pass as u32;
    let resume_mono_ns = mono_ns();
    let commit_to_run = committed.elapsed();
    let mut runner = Runner::spawn(m.vcpu.clone(), opts.pages)?;
    let (mut passes, mut first, mut prev, mut stale, mut counter_ok, mut consecutive) =
        (0u32, None, 0u32, 0u32, true, true);
    let mut failure = None;
    // Generous: a nested guest on a loaded host can run a pass in seconds; the wait
    // ends at the last pass, not at the deadline.
    let deadline = Instant::now() + Duration::from_secs(90);
    while passes < opts.passes_after && stale == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match runner.events.recv_timeout(left) {
            Ok(GuestEvent::Pass { n, counter_ok: ok }) => {
                if first.is_none() {
                    first = Some(n);
                } else if n != prev + 1 {
                    consecutive = false;
                }
                prev = n;
                counter_ok &= ok;
                passes += 1;
            }
            Ok(GuestEvent::Stale { addr }) => {
                stale += 1;
                eprintln!("dst: guest found stale page at {addr:#x}");
            }
            Ok(GuestEvent::Failed(f)) => {
                failure = Some(f);
                break;
            }
            Err(_) => {
                failure = Some("timed out waiting for guest passes".into());
                break;
            }
        }
    }
    runner.stop();
    let first_ok = first == Some(last_pass_src + 1);
    let continued = failure.is_none()
        && stale == 0
        && passes >= opts.passes_after
        && first_ok
        && consecutive
        && counter_ok
        && xmm7
        && in_vmm_ram;
    Ok(json!({
        "role": "dst",
        "guest_continued": continued,
        "stale_pages": stale,
        "passes_after": passes,
        "first_pass": first,
        "first_pass_expected": last_pass_src + 1,
        "consecutive": consecutive,
        "counter_ok": counter_ok,
        "xmm7_ok": xmm7,
        "received_into_vmm_ram": in_vmm_ram,
        "failure": failure,
        "setup_ms": ms(setup),
        "resume_mono_ns": resume_mono_ns,
        "commit_to_run_ms": ms(commit_to_run),
        "state_validate_ms": timings.validate_ns.load(Ordering::Relaxed) as f64 / 1e6,
        "state_restore_ms": timings.restore_ns.load(Ordering::Relaxed) as f64 / 1e6,
        "engine": received.report,
    }))
}
