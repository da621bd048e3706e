//! Central Command: releases, staged rollouts, appliance check-ins, the origin that serves the
//! images, audit log, metrics and (later) the Fleet Updates page.

pub mod engine;
