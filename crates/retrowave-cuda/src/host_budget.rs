//! The pinned host memory that the host tiers of one node may hold, shared by the ranks of its
//! tensor-parallel group.
//!
//! Every rank is charged for the arenas it pins ([`HostBudget::reserve`]) and may hold at most an
//! equal share of the capacity: the ranks own equal numbers of KV heads, so every sequence costs
//! each of them the same, and an equal split is the fair one — one rank cannot take the memory
//! that the others need for their halves of the same sequences. A request beyond the share is a
//! clear error before anything is pinned, instead of a failed (or swapping) allocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::CudaError;

/// Room for host-tier arenas, split equally over `ranks`.
#[derive(Debug)]
pub struct HostBudget {
    capacity: u64,
    used: Vec<AtomicU64>,
}

/// Bytes reserved by one rank; released on drop.
#[derive(Debug)]
pub struct HostCharge {
    budget: Arc<HostBudget>,
    rank: usize,
    bytes: u64,
}

impl Drop for HostCharge {
    fn drop(&mut self) {
        self.budget.used[self.rank].fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl HostCharge {
    /// Bytes this charge holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// `MemAvailable` of this machine in bytes (`None` where /proc/meminfo cannot be read).
pub fn mem_available() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

impl HostBudget {
    /// A budget of `capacity` bytes for `ranks` ranks (at least one).
    pub fn new(capacity: u64, ranks: usize) -> Arc<Self> {
        Arc::new(HostBudget {
            capacity,
            used: (0..ranks.max(1)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The budget of this machine: `RETROWAVE_HOST_KV_GIB` GiB when set, else the available
    /// memory less 8 GiB for everything else (unbounded where it cannot be read).
    pub fn for_machine(ranks: usize) -> Arc<Self> {
        let set = std::env::var("RETROWAVE_HOST_KV_GIB").ok();
        Self::new(machine_capacity(set.as_deref(), mem_available()), ranks)
    }

    /// Ranks sharing the budget.
    pub fn ranks(&self) -> usize {
        self.used.len()
    }

    /// Bytes each rank may hold.
    pub fn share(&self) -> u64 {
        self.capacity / self.ranks() as u64
    }

    /// Bytes `rank` holds now.
    pub fn used(&self, rank: usize) -> u64 {
        self.used[rank].load(Ordering::Acquire)
    }

    /// Charges `bytes` to `rank`, or says why not (its share would be exceeded).
    pub fn reserve(self: &Arc<Self>, rank: usize, bytes: u64) -> Result<HostCharge, CudaError> {
        let share = self.share();
        let slot = &self.used[rank];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur.saturating_add(bytes) > share {
                return Err(CudaError::HostBudget {
                    rank,
                    ranks: self.ranks(),
                    wanted: bytes,
                    used: cur,
                    share,
                });
            }
            match slot.compare_exchange_weak(cur, cur + bytes, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(HostCharge {
                        budget: self.clone(),
                        rank,
                        bytes,
                    });
                }
                Err(now) => cur = now,
            }
        }
    }
}

/// The machine budget in bytes from `RETROWAVE_HOST_KV_GIB` (`set`: GiB, a non-negative number)
/// or, when it is unset or not such a number, from the `available` memory less 8 GiB (unbounded
/// where that cannot be read).
fn machine_capacity(set: Option<&str>, available: Option<u64>) -> u64 {
    set.and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|g| *g >= 0.0)
        .map(|g| (g * (1u64 << 30) as f64) as u64)
        .unwrap_or_else(|| available.map_or(u64::MAX, |m| m.saturating_sub(8 << 30)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_holds_at_most_its_share_and_charges_are_returned() {
        let b = HostBudget::new(100, 2);
        assert_eq!(b.share(), 50);
        let a = b.reserve(0, 30).unwrap();
        let a2 = b.reserve(0, 20).unwrap();
        assert_eq!(b.used(0), 50);
        // Rank 0 is full; rank 1's share is untouched by it.
        let e = b.reserve(0, 1).unwrap_err().to_string();
        assert!(e.contains("rank 0 of 2"), "{e}");
        let c = b.reserve(1, 50).unwrap();
        assert_eq!((b.used(1), c.bytes()), (50, 50));
        drop(a);
        assert_eq!(b.used(0), 20);
        let _a3 = b.reserve(0, 30).unwrap();
        drop((a2, c));
        assert_eq!((b.used(0), b.used(1)), (30, 0));
    }

    #[test]
    fn concurrent_reservations_never_pass_the_share() {
        let b = HostBudget::new(1000, 1);
        let held: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..50)
                            .filter_map(|_| b.reserve(0, 7).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(held.len(), 1000 / 7);
        assert_eq!(b.used(0), (1000 / 7) * 7);
        drop(held);
        assert_eq!(b.used(0), 0);
    }

    #[test]
    fn the_machine_budget_follows_the_environment_or_the_free_memory() {
        // The rule as a pure function: the free memory moves while other tests run, so it is
        // not read twice and compared here.
        const GIB: u64 = 1 << 30;
        // The variable wins when it is a non-negative number of GiB.
        assert_eq!(machine_capacity(Some("2.5"), Some(64 * GIB)), 5 * GIB / 2);
        assert_eq!(machine_capacity(Some(" 0 "), None), 0);
        // Otherwise the available memory less 8 GiB, none below 8 GiB, unbounded if unknown.
        for bad in [None, Some("lots"), Some("-1")] {
            assert_eq!(machine_capacity(bad, Some(40 * GIB)), 32 * GIB);
            assert_eq!(machine_capacity(bad, Some(4 * GIB)), 0);
            assert_eq!(machine_capacity(bad, None), u64::MAX);
        }
    }
}
