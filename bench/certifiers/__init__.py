"""Certifiers: randomized smoothing (CERTIFY/PREDICT), Lipschitz margin, and the certificate audit."""
