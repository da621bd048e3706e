//! Central Command: releases, staged rollouts, appliance check-ins, the origin that serves the
//! images, audit log, metrics and the Fleet Updates page.
//!
//! Not built yet: see the coordinator issue. Nothing here claims to work.
