from hello import greeting


def test_greeting_comes_from_the_image_env():
    assert greeting() == 'hello "$USER" \\ world'
