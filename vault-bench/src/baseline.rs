//! The physical limit: raw opaque-ke server logins and registrations with
//! in-memory keys, same cipher suite, timed in this process on one thread.
//! No PKCS#11, no storage, no network.
//!
//! Only the server's side is timed: the client messages are made before or
//! between the timed phases.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialFinalization, CredentialRequest, ServerLogin,
    ServerLoginParameters, ServerRegistration, ServerSetup,
};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use vault_proto::suite::{benchmark_ksf, Suite};

use crate::os::thread_cpu;

/// CPU and wall time per server operation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PerOp {
    pub count: usize,
    pub cpu_us: f64,
    pub wall_us: f64,
}

impl PerOp {
    fn new(count: usize, cpu: Duration, wall: Duration) -> Self {
        PerOp {
            count,
            cpu_us: cpu.as_secs_f64() * 1e6 / count as f64,
            wall_us: wall.as_secs_f64() * 1e6 / count as f64,
        }
    }

    /// Operations per second of one core at this CPU cost.
    pub fn per_core_second(&self) -> f64 {
        1e6 / self.cpu_us
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Baseline {
    /// Server login: `ServerLogin::start` + `ServerLogin::finish`.
    pub login: PerOp,
    /// Server registration: `ServerRegistration::start` + `finish`.
    pub registration: PerOp,
}

const PASSWORD: &[u8] = b"baseline password";

/// Runs `logins` server logins and `registrations` server registrations.
pub fn measure(logins: usize, registrations: usize) -> Result<Baseline> {
    let rng = &mut OsRng;
    let setup = ServerSetup::<Suite>::new(rng);
    let ksf = benchmark_ksf();
    let bad = |what: &'static str| move |_| anyhow!("baseline: {what} failed");

    // Registrations: the client's messages first, then the server's steps.
    let starts: Vec<_> = (0..registrations.max(1))
        .map(|_| ClientRegistration::<Suite>::start(rng, PASSWORD))
        .collect::<Result<_, _>>()
        .map_err(bad("registration start"))?;
    let mut responses = Vec::with_capacity(starts.len());
    let (cpu0, wall0) = (thread_cpu()?, Instant::now());
    for (i, s) in starts.iter().enumerate() {
        let r = ServerRegistration::<Suite>::start(&setup, s.message.clone(), &id(i))
            .map_err(bad("server registration start"))?;
        responses.push(r.message);
    }
    let (mut cpu, mut wall) = (thread_cpu()? - cpu0, wall0.elapsed());
    let mut uploads = Vec::with_capacity(starts.len());
    for (s, r) in starts.into_iter().zip(responses) {
        let f = s
            .state
            .finish(
                rng,
                PASSWORD,
                r,
                ClientRegistrationFinishParameters::new(Default::default(), Some(&ksf)),
            )
            .map_err(bad("client registration finish"))?;
        uploads.push(f.message);
    }
    let (cpu0, wall0) = (thread_cpu()?, Instant::now());
    let files: Vec<ServerRegistration<Suite>> = uploads
        .into_iter()
        .map(ServerRegistration::<Suite>::finish)
        .collect();
    cpu += thread_cpu()? - cpu0;
    wall += wall0.elapsed();
    let registration = PerOp::new(files.len(), cpu, wall);

    // Logins against the first password file.
    let file = files
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("baseline: no registration"))?;
    let clients: Vec<_> = (0..logins.max(1))
        .map(|_| ClientLogin::<Suite>::start(rng, PASSWORD))
        .collect::<Result<_, _>>()
        .map_err(bad("login start"))?;
    let ke1s: Vec<CredentialRequest<Suite>> = clients.iter().map(|c| c.message.clone()).collect();
    let mut servers = Vec::with_capacity(ke1s.len());
    let (cpu0, wall0) = (thread_cpu()?, Instant::now());
    for ke1 in ke1s {
        let s = ServerLogin::start(
            rng,
            &setup,
            Some(file.clone()),
            ke1,
            &id(0),
            ServerLoginParameters::default(),
        )
        .map_err(bad("server login start"))?;
        servers.push(s);
    }
    let (mut cpu, mut wall) = (thread_cpu()? - cpu0, wall0.elapsed());
    let mut ke3s: Vec<CredentialFinalization<Suite>> = Vec::with_capacity(servers.len());
    for (c, s) in clients.into_iter().zip(&servers) {
        let f = c
            .state
            .finish(
                rng,
                PASSWORD,
                s.message.clone(),
                ClientLoginFinishParameters::new(None, Default::default(), Some(&ksf)),
            )
            .map_err(bad("client login finish"))?;
        ke3s.push(f.message);
    }
    let count = servers.len();
    let (cpu0, wall0) = (thread_cpu()?, Instant::now());
    for (s, ke3) in servers.into_iter().zip(ke3s) {
        s.state
            .finish(ke3, ServerLoginParameters::default())
            .map_err(bad("server login finish"))?;
    }
    cpu += thread_cpu()? - cpu0;
    wall += wall0.elapsed();
    Ok(Baseline {
        login: PerOp::new(count, cpu, wall),
        registration,
    })
}

fn id(i: usize) -> Vec<u8> {
    format!("baseline-{i}").into_bytes()
}

#[cfg(test)]
mod tests {
    #[test]
    fn baseline_runs_real_logins() {
        let b = super::measure(20, 5).expect("baseline");
        assert_eq!(b.login.count, 20);
        assert_eq!(b.registration.count, 5);
        assert!(b.login.cpu_us > 0.0 && b.registration.cpu_us > 0.0);
    }
}
