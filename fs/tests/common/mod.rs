//! Helpers shared by the integration tests.

/// Group pending cache lines into the units a crash persists independently:
/// each line of a short run (metadata: journal transactions, inodes,
/// directory entries, bitmap words) on its own, and each long run (file data
/// and zeroing, more than 4 KiB) as a whole, as Chipmunk enumerates whole
/// writes. Without that, a 3 MiB fallocate alone would leave 49,152 pending
/// lines and a billion pairs.
pub fn crash_units(lines: &[u64]) -> Vec<Vec<u64>> {
    let mut runs: Vec<Vec<u64>> = Vec::new();
    for &line in lines {
        match runs.last_mut() {
            Some(run) if run.last() == Some(&(line - 64)) => run.push(line),
            _ => runs.push(vec![line]),
        }
    }
    runs.into_iter()
        .flat_map(|run| {
            if run.len() > 64 {
                vec![run]
            } else {
                run.into_iter().map(|l| vec![l]).collect()
            }
        })
        .collect()
}
