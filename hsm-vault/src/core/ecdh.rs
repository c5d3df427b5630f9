//! The 3DH static share computed with the AKE private key inside the token.
//!
//! PKCS#11 ECDH (`CKM_ECDH1_DERIVE`, null KDF) yields only the x-coordinate
//! of `sk·C`, while OPAQUE's 3DH needs the whole point. The y parity is
//! recovered with a second derive against `C + G`: since
//! `sk·(C + G) = sk·C + PK`, exactly one of the two points with that
//! x-coordinate, added to the server public key `PK`, has the x-coordinate
//! the token returned. The choice is made in constant time.

use opaque_ke::keypair::PublicKey;
use p256::elliptic_curve::point::{AffineCoordinates, DecompressPoint};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{AffinePoint, NistP256, ProjectivePoint};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use zeroize::Zeroizing;

use super::{CoreError, Token};

type Share = generic_array::GenericArray<u8, generic_array::typenum::U33>;

/// The server's AKE public key, kept as a point and as its compressed bytes.
#[derive(Clone, Debug)]
pub struct ServerPublic {
    pub point: ProjectivePoint,
    pub compressed: [u8; 33],
}

impl ServerPublic {
    pub fn from_sec1(bytes: &[u8]) -> Option<Self> {
        let pk = p256::PublicKey::from_sec1_bytes(bytes).ok()?;
        let compressed: [u8; 33] = pk.to_encoded_point(true).as_bytes().try_into().ok()?;
        Some(ServerPublic {
            point: pk.to_projective(),
            compressed,
        })
    }
}

/// Offset and length of the client's ephemeral public key in an RFC 9807
/// KE1 for P256-SHA256: blinded element (33) || client nonce (32) || key (33).
const KE1_EPHEMERAL: std::ops::Range<usize> = 65..98;

/// `-G`, SEC1 compressed: the one ephemeral key whose shifted point `C + G`
/// is the point at infinity, which no token can derive against.
fn minus_generator() -> p256::EncodedPoint {
    (-ProjectivePoint::GENERATOR)
        .to_affine()
        .to_encoded_point(true)
}

/// Checks, before a guess is charged, that the KE1's ephemeral key is one
/// [`shared_point`] can use. The KE1 has already been parsed, so its key is
/// a valid compressed point, whose encoding is unique: comparing bytes is
/// enough (and the key is public, so the comparison need not be constant
/// time).
pub fn usable_ke1(ke1: &[u8]) -> bool {
    ke1.get(KE1_EPHEMERAL)
        .is_some_and(|key| key != minus_generator().as_bytes())
}

/// Computes `sk·C` for the client's ephemeral key `C`, SEC1 compressed.
pub fn shared_point(
    token: &impl Token,
    server: &ServerPublic,
    client: &PublicKey<NistP256>,
) -> Result<Share, CoreError> {
    let unusable = || CoreError::InvalidMessage("KE1 ephemeral key");
    let c = client.to_group_type().0.to_point();
    let shifted = (c + ProjectivePoint::GENERATOR).to_affine();
    if bool::from(shifted.is_identity()) {
        return Err(unusable());
    }
    let x = token.ecdh_x(c.to_affine().to_encoded_point(true).as_bytes())?;
    let check_x = token.ecdh_x(shifted.to_encoded_point(true).as_bytes())?;
    if x.len() != 32 || check_x.len() != 32 {
        return Err(unusable());
    }
    let x_field = p256::FieldBytes::clone_from_slice(&x);
    let even: Option<AffinePoint> =
        AffinePoint::decompress(&x_field, subtle::Choice::from(0)).into();
    let even = even.ok_or_else(unusable)?;
    let candidate = (server.point + even).to_affine();
    // If even + PK matches the token's second answer, sk·C is the even point.
    let is_even = candidate.x().as_slice().ct_eq(&check_x[..]);
    let mut share = Zeroizing::new([0u8; 33]);
    share[0] = u8::conditional_select(&0x03, &0x02, is_even);
    share[1..].copy_from_slice(&x);
    Ok(Share::clone_from_slice(share.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_minus_g_is_refused_as_an_ephemeral_key() {
        let mut ke1 = [0u8; 98];
        ke1[KE1_EPHEMERAL].copy_from_slice(minus_generator().as_bytes());
        assert!(!usable_ke1(&ke1));
        let g = ProjectivePoint::GENERATOR
            .to_affine()
            .to_encoded_point(true);
        ke1[KE1_EPHEMERAL].copy_from_slice(g.as_bytes());
        assert!(usable_ke1(&ke1));
        assert!(!usable_ke1(&ke1[..97]), "a short KE1 has no key");
    }
}
