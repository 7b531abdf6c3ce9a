//! Joining a fleet when the engine is built: what the builder was told of it, checked, and
//! the credential salt every replica keys with. Without the `redis` feature there is no
//! fleet to join, and the engine keys with its own salt.

use super::builder::without_credentials;
use crate::error::Error;
#[cfg(feature = "redis")]
use crate::error::ErrorKind;
use crate::fleet::Fleet;
#[cfg(feature = "redis")]
use crate::fleet::{FleetSecret, FleetSettings, RedisMode, Seal};

/// What the builder was told of a fleet (set only with the `redis` feature).
#[derive(Clone, Default)]
pub(super) struct FleetOptions {
    /// The fleet's Redis URL (`DedupBuilder::redis`).
    pub(super) redis: Option<String>,
    /// Where the other replicas reach this one (`DedupBuilder::advertise`).
    pub(super) advertise: Option<String>,
    #[cfg(feature = "redis")]
    pub(super) secret: Option<FleetSecret>,
    #[cfg(feature = "redis")]
    pub(super) mode: RedisMode,
}

/// What joining gave the engine.
pub(super) struct Joined {
    /// The fleet, if the engine has one.
    pub(super) fleet: Option<Fleet>,
    /// The salt credentials are keyed with.
    pub(super) salt: [u8; 32],
    /// Whether that salt is the fleet's (or there is no fleet): false when Redis could not be
    /// read at start-up, and the engine keys alone until it restarts.
    pub(super) salted: bool,
}

impl std::fmt::Debug for FleetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = f.debug_struct("FleetOptions");
        shown
            .field("redis", &self.shown())
            .field("advertise", &self.advertise);
        #[cfg(feature = "redis")]
        shown
            .field("secret", &self.secret.as_ref().map(|_| "(set)"))
            .field("mode", &self.mode);
        shown.finish()
    }
}

impl FleetOptions {
    /// The Redis URL without its user and password, as logs and errors show it.
    pub(super) fn shown(&self) -> Option<String> {
        self.redis.as_deref().map(without_credentials)
    }

    /// Checks the settings and makes the fleet (connections come later), with the salt to
    /// key credentials with: the fleet's, or `local_salt` when there is no fleet (or its
    /// Redis cannot be read now).
    #[cfg(feature = "redis")]
    pub(super) fn join(&self, max_entry: u64, local_salt: [u8; 32]) -> Result<Joined, Error> {
        let advertised = match (&self.advertise, &self.redis) {
            (None, _) => None,
            (Some(url), Some(_)) => Some(
                crate::fleet::advertised_url(url).map_err(|m| Error::new(ErrorKind::Cache, m))?,
            ),
            (Some(_), None) => {
                return Err(Error::new(
                    ErrorKind::Cache,
                    "an advertised address is for the other replicas of a fleet: it needs a Redis",
                ));
            }
        };
        if self.secret.is_some() && self.redis.is_none() {
            return Err(Error::new(
                ErrorKind::Cache,
                "a fleet secret is for the replicas of a fleet: it needs a Redis",
            ));
        }
        let settings = FleetSettings {
            advertised,
            seal: self.secret.as_ref().map(Seal::new),
            max_entry,
            mode: self.mode,
        };
        let Some(url) = &self.redis else {
            return Ok(Joined {
                fleet: None,
                salt: local_salt,
                salted: true,
            });
        };
        let fleet = Fleet::new(url, settings)
            .map_err(|e| Error::with_source(ErrorKind::Cache, "the Redis URL is not valid", e))?;
        // Every replica must compute the same keys: the fleet's salt, the first replica's own.
        let (salt, salted) = match fleet.shared_salt(&local_salt) {
            Some(salt) => (salt, true),
            None => {
                tracing::warn!(
                    "Redis cannot be reached at start-up: this replica uses its own credential \
                     salt, so until it restarts its per-credential entries are its own (entries \
                     of a --shared-cache are still shared)"
                );
                (local_salt, false)
            }
        };
        Ok(Joined {
            fleet: Some(fleet),
            salt,
            salted,
        })
    }

    /// Without the `redis` feature nothing can set a fleet: the engine keys alone.
    #[cfg(not(feature = "redis"))]
    pub(super) fn join(&self, _max_entry: u64, local_salt: [u8; 32]) -> Result<Joined, Error> {
        Ok(Joined {
            fleet: None,
            salt: local_salt,
            salted: true,
        })
    }
}
