//! Grants: a skill owner's signed permission for one peer to call some of its skills.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::envelope::{Kind, Payload, Validity};
use crate::error::ValidationError;
use crate::limits::*;
use crate::skill::SkillName;
use crate::time::Timestamp;

/// Permission for `grantee` to call `skills` of `issuer` until `expires_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The skill owner who signs the grant.
    pub issuer: PeerId,
    /// The peer allowed to call.
    pub grantee: PeerId,
    /// The skills allowed; empty means every skill of the issuer with share mode `grants`.
    pub skills: Vec<SkillName>,
    /// Valid from.
    pub issued_at: Timestamp,
    /// Valid until.
    pub expires_at: Timestamp,
}

impl Grant {
    /// Whether this grant covers `skill`.
    pub fn covers(&self, skill: &SkillName) -> bool {
        self.skills.is_empty() || self.skills.contains(skill)
    }
}

impl Payload for Grant {
    const KIND: Kind = Kind::Grant;

    fn author(&self) -> PeerId {
        self.issuer
    }

    fn validity(&self) -> Option<Validity> {
        Some(Validity {
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        })
    }

    fn validate(&self) -> Result<(), ValidationError> {
        if self.skills.len() > MAX_GRANT_SKILLS {
            return Err(ValidationError::new(
                "skills",
                format!("{} skills, at most {MAX_GRANT_SKILLS}", self.skills.len()),
            ));
        }
        check_window(self.issued_at, self.expires_at, MAX_GRANT_LIFETIME)
    }
}

/// Checks `issued_at < expires_at <= issued_at + max`.
pub(crate) fn check_window(
    issued_at: Timestamp,
    expires_at: Timestamp,
    max: std::time::Duration,
) -> Result<(), ValidationError> {
    if expires_at <= issued_at {
        return Err(ValidationError::new(
            "expires_at",
            format!("{expires_at} is not after issued_at {issued_at}"),
        ));
    }
    if expires_at.since(issued_at) > max {
        return Err(ValidationError::new(
            "expires_at",
            format!(
                "{} ms after issued_at, at most {} ms",
                expires_at.since(issued_at).as_millis(),
                max.as_millis()
            ),
        ));
    }
    Ok(())
}
