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

/// Computes `sk·C` for the client's ephemeral key `C`, SEC1 compressed.
pub fn shared_point(
    token: &impl Token,
    server: &ServerPublic,
    client: &PublicKey<NistP256>,
) -> Result<Share, CoreError> {
    let client_bytes = client.serialize();
    let c = p256::PublicKey::from_sec1_bytes(&client_bytes)
        .map_err(|_| CoreError::InvalidMessage("KE1 ephemeral key"))?;
    let shifted = (c.to_projective() + ProjectivePoint::GENERATOR).to_affine();
    let shifted = shifted.to_encoded_point(true);

    let x = token.ecdh_x(&client_bytes)?;
    let check_x = token.ecdh_x(shifted.as_bytes())?;
    if x.len() != 32 || check_x.len() != 32 {
        return Err(CoreError::InvalidMessage("KE1 ephemeral key"));
    }
    let x_field = p256::FieldBytes::clone_from_slice(&x);
    let even: Option<AffinePoint> =
        AffinePoint::decompress(&x_field, subtle::Choice::from(0)).into();
    let even = even.ok_or(CoreError::InvalidMessage("KE1 ephemeral key"))?;
    let candidate = (server.point + even).to_affine();
    // If even + PK matches the token's second answer, sk·C is the even point.
    let is_even = candidate.x().as_slice().ct_eq(&check_x[..]);
    let mut share = Zeroizing::new([0u8; 33]);
    share[0] = u8::conditional_select(&0x03, &0x02, is_even);
    share[1..].copy_from_slice(&x);
    Ok(Share::clone_from_slice(share.as_ref()))
}
