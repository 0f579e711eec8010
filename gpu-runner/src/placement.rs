//! Which of a model's sessions (one per device) a job goes to: a pure function, so the policy is
//! tested without devices.
//!
//! The least loaded: the fewest jobs handed to the session and not yet rendered (queued in it,
//! waiting for a batch, or rendering), then the most free device memory where it is known, then
//! the first. A job joins a session's batch only while it waits there, so spreading by queue
//! depth keeps every device busy and each one's batches as full as the load allows.

/// How loaded one session's device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Jobs handed to the session that it has not answered yet.
    pub queued: usize,
    /// Free memory of its device in bytes, where known.
    pub free_memory: Option<u64>,
}

/// The index of the least loaded of `loads`; `None` when there are none.
pub fn least_loaded(loads: &[Load]) -> Option<usize> {
    loads
        .iter()
        .enumerate()
        .min_by_key(|(index, load)| (load.queued, std::cmp::Reverse(load.free_memory.unwrap_or(0)), *index))
        .map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(queued: usize, free_gb: Option<u64>) -> Load {
        Load { queued, free_memory: free_gb.map(|gb| gb << 30) }
    }

    #[test]
    fn the_shortest_queue_wins_then_the_most_free_memory_then_the_first() {
        assert_eq!(least_loaded(&[load(2, Some(70)), load(1, Some(10)), load(3, Some(80))]), Some(1));
        assert_eq!(least_loaded(&[load(1, Some(10)), load(1, Some(70)), load(1, Some(40))]), Some(1));
        assert_eq!(least_loaded(&[load(0, None), load(0, None)]), Some(0));
        assert_eq!(least_loaded(&[load(0, None), load(0, Some(1))]), Some(1), "known free memory beats unknown");
        assert_eq!(least_loaded(&[]), None);
    }

    #[test]
    fn jobs_placed_one_after_another_spread_over_the_devices() {
        let mut loads = vec![load(0, None); 4];
        let mut placed = Vec::new();
        for _ in 0..8 {
            let device = least_loaded(&loads).unwrap();
            loads[device].queued += 1;
            placed.push(device);
        }
        assert_eq!(placed, [0, 1, 2, 3, 0, 1, 2, 3]);
        // A device that finished its work gets the next job.
        loads[2].queued = 0;
        assert_eq!(least_loaded(&loads), Some(2));
    }
}
