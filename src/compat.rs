//! Compatibility helpers for the setup stage: processor compatibility mode.
//!
//! A VM can only move to a host whose CPU offers every feature the VM uses. In
//! *processor compatibility mode* the VM is restricted up front to the features all
//! hosts of a cluster share ([`common_cpu_features`]), so it can move to any of
//! them. On the source, [`crate::engine::MigrationConfig::processor_compat`] holds
//! that common set and the engine sends only the VM's features within it
//! ([`restrict_cpu_features`]); the destination checks required ⊆ its own.

use crate::wire::control::CompatVector;

/// The CPU features every host in `hosts` offers, in the first host's order,
/// without duplicates. No hosts: no features.
pub fn common_cpu_features(hosts: &[&[String]]) -> Vec<String> {
    let Some((first, rest)) = hosts.split_first() else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for f in first.iter() {
        if rest.iter().all(|h| h.contains(f)) && !out.contains(f) {
            out.push(f.clone());
        }
    }
    out
}

/// Features in `required` that `available` lacks, in `required`'s order.
pub fn missing_features(required: &[String], available: &[String]) -> Vec<String> {
    required
        .iter()
        .filter(|f| !available.contains(f))
        .cloned()
        .collect()
}

/// The compatibility vector of a VM running in processor compatibility mode: its
/// required CPU features restricted to `common` (switches unchanged).
pub fn restrict_cpu_features(compat: &CompatVector, common: &[String]) -> CompatVector {
    CompatVector {
        cpu_features: common_cpu_features(&[&compat.cpu_features, common]),
        switches: compat.switches.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn common_subset() {
        let a = v(&["sse4.2", "avx", "avx2", "avx512f", "avx"]);
        let b = v(&["sse4.2", "avx", "avx2"]);
        let c = v(&["avx", "sse4.2", "aes"]);
        assert_eq!(common_cpu_features(&[&a, &b, &c]), v(&["sse4.2", "avx"]));
        assert_eq!(
            common_cpu_features(&[&a]),
            v(&["sse4.2", "avx", "avx2", "avx512f"])
        );
        assert!(common_cpu_features(&[]).is_empty());
        assert_eq!(missing_features(&a, &b), v(&["avx512f"]));
        let cv = CompatVector {
            cpu_features: a.clone(),
            switches: v(&["ext"]),
        };
        let r = restrict_cpu_features(&cv, &common_cpu_features(&[&a, &b]));
        assert_eq!(r.cpu_features, v(&["sse4.2", "avx", "avx2"]));
        assert_eq!(r.switches, v(&["ext"]));
    }
}
