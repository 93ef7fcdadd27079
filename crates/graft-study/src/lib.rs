//! graft-study: the study layer, over the operations and the trainer's results.
//!
//! `experiment` plans and runs the SNR-selective merging study (steps as a graph, resumable, on this machine or as
//! Slurm jobs) by running the graft binary per step; `report` reads results lines and writes the tables, the charts
//! (plotters, no system fonts) and the self-contained report page.
//!
//! ```
//! use graft_study::report::bootstrap::percentile;
//!
//! // numpy's default (linear) percentile: the 25th of 1..=5 is 2, the 90th lies 60% of the way from 4 to 5.
//! assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25), 2.0);
//! assert!((percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.9) - 4.6).abs() < 1e-12);
//! ```

// graft-core's and graft-ops' modules under the names this crate's code has always used.
use graft_core::{error, files, rng};
use graft_ops::snr;

pub mod experiment;
pub mod report;
