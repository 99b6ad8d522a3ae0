"""aMUSEd backbone on diffusers UVit2DModel and VQModel."""
